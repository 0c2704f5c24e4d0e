"""Host functions a cell calls: sub-calls become `subcalls` updates.

Runs in the sandbox thread. Each batch is one update (or several, for a
batch too large for one payload) whose id names the cell, the batch's number
and a digest of what it asks: a cell re-run after a crash that asks the same
thing sends the same ids and is answered from what already completed; one
that asks something else (a `set` iterated in another order) sends new ids,
and the workflow answers each item it has seen by what the item asks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections import Counter, deque
from typing import Any

from temporalio import activity

from activities.object_store import StorageError
from activities.runtime import WorkerRuntime
from activities.temporal_client import until_admitted
from workflows.names import UPDATE_SUBCALLS
from workflows.refs import INLINE_LIMIT_BYTES, ContextRef
from workflows.request import MAX_QUESTION_CHARS
from workflows.result import RunResult
from workflows.steps import MAX_BATCH_ITEMS, SubcallAnswer, SubcallBatch, SubcallItem, SubcallReply, batch_digest

# One update payload stays far below the server's 2 MiB limit: inline text,
# and everything else an item carries (refs, context refs), per update.
BATCH_INLINE_BUDGET = 512 * 1024
BATCH_PAYLOAD_BUDGET = 1024 * 1024
WAIT_POLL_S = 0.5
# Prompts by ref per part of a batch: the first part's update goes as soon as
# its prompts are hashed (20 x 200 KB), while the next part's are.
REF_BYTES_PER_PART = 4 * 1024 * 1024
# Parts of one batch awaiting their answers at once: Temporal documents a
# limit of 10 in-flight updates per workflow execution (the dev server let
# 30 through in tests/test_batch_parts.py; a production cluster may not).
UPDATES_IN_FLIGHT = 8

# The host functions every cell has: guest-facing name -> CellHost method.
_CELL_HOST_METHODS = {
    "llm_query": "llm_query",
    "llm_query_batched": "llm_query_batched",
    "rlm_query": "rlm_query",
    "rlm_query_batched": "rlm_query_batched",
    "FINAL": "final_answer",
    "FINAL_VAR": "final_var",
    "document_names": "document_names",
}
CELL_HOST_NAMES = tuple(_CELL_HOST_METHODS)
"""The names of `CellHost.functions()`: a session is made with them all (the
cell being run installs their implementations)."""
# Host functions that answer at once: their caller keeps its whole cap (lending
# would only churn the pool's lock, and could make FINAL wait for memory).
INSTANT_HOST_NAMES = frozenset({"FINAL", "FINAL_VAR", "document_names"})


class CellHost:
    """The host side of one cell: sub-calls, FINAL, counters."""

    def __init__(self, runtime: WorkerRuntime, workflow_id: str, cell_id: str, parent_context: ContextRef) -> None:
        self._rt = runtime
        self._workflow_id = workflow_id
        self._cell_id = cell_id
        self._parent_context = parent_context
        self._seq = 0
        self._asked: Counter[tuple] = Counter()
        self.subcalls = 0
        self.final: str | None = None
        self.worker_stopping = False
        """A sub-call was cut short because this worker shuts down: the cell's
        outcome says nothing about its code (run_cell retries it elsewhere)."""

    def functions(self) -> dict[str, Any]:
        """Every name of CELL_HOST_NAMES -> this cell's implementation."""
        return {name: getattr(self, method) for name, method in _CELL_HOST_METHODS.items()}

    # -- guest-facing --------------------------------------------------------
    def llm_query(self, prompt: Any, model: str | None = None) -> str:
        return self._batch("llm", [_text("prompt", prompt)], [None], model)[0]

    def llm_query_batched(self, prompts: Any, model: str | None = None) -> list[str]:
        texts = [_text("prompts[%d]" % i, p) for i, p in enumerate(_sequence("prompts", prompts))]
        return self._batch("llm", texts, [None] * len(texts), model) if texts else []

    def rlm_query(self, question: Any, context: Any = None, model: str | None = None) -> str:
        return self._batch("rlm", [_text("question", question)], [context], model)[0]

    def rlm_query_batched(self, questions: Any, contexts: Any = None, model: str | None = None) -> list[str]:
        texts = [_text("questions[%d]" % i, q) for i, q in enumerate(_sequence("questions", questions))]
        ctxs = [None] * len(texts) if contexts is None else list(_sequence("contexts", contexts))
        if len(ctxs) != len(texts):
            raise ValueError(f"rlm_query_batched got {len(texts)} questions but {len(ctxs)} contexts")
        return self._batch("rlm", texts, ctxs, model) if texts else []

    def final_answer(self, answer: Any) -> None:
        self.final = valid_text(str(answer))

    def final_var(self, name: str, value: Any) -> None:
        self.final = valid_text(str(value))

    def document_names(self) -> list[str]:
        """Every document's name in context order ([] for unnamed documents):
        the guest's `document(name)` looks names up in it."""
        manifest = self._rt.contexts.manifest(self._parent_context)
        if not any(d.name for d in manifest.documents[:1]):
            return []
        return [d.name or "" for d in manifest.documents]

    # -- one update ------------------------------------------------------------
    def _batch(self, kind: str, texts: list[str], contexts: list[Any], model: str | None) -> list[str]:
        """Every part of a batch is sent as soon as its items are made, and up
        to UPDATES_IN_FLIGHT parts are in flight together. Long prompts are
        stored behind their update (`_items`); the batch returns once its
        answers have come and its prompts are stored, so a cell that completed
        never leaves a sub-call whose prompt is not in the bucket."""
        if model is not None and not isinstance(model, str):
            raise TypeError("model= must be a model name (str) or None")
        handle = self._rt.client.get_workflow_handle(self._workflow_id)
        waiting: deque[tuple[int, concurrent.futures.Future]] = deque()
        uploads: list[concurrent.futures.Future] = []  # prompts stored behind their updates
        out: list[str] = []
        try:
            for indexes, inline in _parts(kind, texts):
                part = self._items(kind, [texts[i] for i in indexes], [contexts[i] for i in indexes], inline, uploads)
                for items in _chunks(part):
                    if len(waiting) >= UPDATES_IN_FLIGHT:
                        self._collect(*waiting.popleft(), out)
                    self._seq += 1
                    batch = SubcallBatch(
                        cell_id=self._cell_id,
                        seq=self._seq,
                        kind=kind,
                        model=model,
                        items=items,
                        digest=batch_digest(kind, model, items),
                    )
                    update = until_admitted(
                        lambda batch=batch: handle.execute_update(
                            UPDATE_SUBCALLS, batch, id=batch.update_id(), result_type=SubcallReply
                        )
                    )
                    waiting.append((len(items), asyncio.run_coroutine_threadsafe(update, self._rt.loop)))
            while waiting:
                self._collect(*waiting.popleft(), out)
            _stored(uploads)
            return out
        finally:
            # A refused part ends the wait for the others (the run still
            # answers the parts it accepted; those not sent are never sent).
            for _, future in waiting:
                future.cancel()

    def _collect(self, count: int, future: concurrent.futures.Future, out: list[str]) -> None:
        reply: SubcallReply = self._result(future)
        self.subcalls += count
        out.extend(self._text(answer) for answer in reply.answers)

    def send_update(self, update: str, arg: Any, *, update_id: str, result_type: type) -> Any:
        """Send this cell's run an update and wait for its result, as sub-calls
        do (custom tools use it: activities/_tool_host.py)."""
        handle = self._rt.client.get_workflow_handle(self._workflow_id)
        return self._wait(until_admitted(lambda: handle.execute_update(update, arg, id=update_id, result_type=result_type)))

    def _text(self, answer: SubcallAnswer) -> str:
        if answer.text_ref is not None:
            return self._rt.store.get_blob(answer.text_ref).decode()
        if answer.text is not None:
            return answer.text
        if answer.child_workflow_id is not None:
            # A child's answer too long for the update reply: its own result has it.
            handle = self._rt.client.get_workflow_handle(answer.child_workflow_id, result_type=RunResult)
            result: RunResult = self._wait(handle.result())
            if result.answer_ref is not None:
                return self._rt.store.get_blob(result.answer_ref).decode()
            return result.answer or ""
        return answer.error or ""

    def _wait(self, coro: Any) -> Any:
        return self._result(asyncio.run_coroutine_threadsafe(coro, self._rt.loop))

    def _result(self, future: concurrent.futures.Future) -> Any:
        # Poll so a cancelled cell or a stopping worker never leaves this thread
        # blocked on an update that will not be answered.
        while True:
            try:
                return future.result(timeout=WAIT_POLL_S)
            except concurrent.futures.TimeoutError:
                if activity.is_cancelled() or activity.is_worker_shutdown():
                    future.cancel()
                    self.worker_stopping = self.worker_stopping or activity.is_worker_shutdown()
                    raise RuntimeError("the cell was cancelled") from None
            except Exception as exc:
                raise RuntimeError(f"sub-call refused: {_cause(exc)}") from None

    def _items(
        self, kind: str, texts: list[str], contexts: list[Any], inline: list[bool], uploads: list[concurrent.futures.Future]
    ) -> list[SubcallItem]:
        # Prompts that travel by ref are stored behind the update, in
        # parallel (`uploads`): this worker's sub-calls read them from memory
        # meanwhile, another worker's wait for them. Stored first, 20 prompts
        # of 200 KB held the first calls back 7 ms on a quiet machine, and
        # 0.18 s while `rlm run` uploaded its 40 MB context to the same server.
        by_ref = [text.encode() for text, small in zip(texts, inline) if not small]
        stored = [self._rt.store.put_blob_behind(data, self._rt.io_pool) for data in by_ref]
        uploads.extend(upload for _, upload in stored)
        refs = iter(ref for ref, _ in stored)
        items = []
        for text, context, small in zip(texts, contexts, inline):
            ctx_ref = None
            if context is not None:
                ctx_ref = self._rt.contexts.put_value(_context_value(context))
            if small:
                item = SubcallItem(text=text, text_chars=len(text), context=ctx_ref)
            else:
                item = SubcallItem(text_ref=next(refs), text_chars=len(text), context=ctx_ref)
            # The n-th time this cell asks the same thing is its own call.
            what = (kind, item.text_sha256(), ctx_ref.sha256 if ctx_ref else None)
            items.append(item.model_copy(update={"occurrence": self._asked[what]}))
            self._asked[what] += 1
        return items


def _stored(uploads: list[concurrent.futures.Future]) -> None:
    for upload in uploads:
        try:
            upload.result()
        except StorageError as exc:
            raise RuntimeError(f"the sub-calls' prompts could not be stored: {exc}") from None


def _parts(kind: str, texts: list[str]) -> list[tuple[list[int], list[bool]]]:
    """The batch's texts in the order given, cut where the prompts stored by
    ref reach REF_BYTES_PER_PART, each text marked inline or by ref."""
    parts: list[tuple[list[int], list[bool]]] = [([], [])]
    inline_total = ref_bytes = 0
    for index, text in enumerate(texts):
        size = len(text.encode())
        # A child's question must travel inline (it starts the child); one
        # that is too long goes by ref and comes back as an error string.
        if kind == "rlm":
            small = len(text) <= MAX_QUESTION_CHARS
        else:
            small = size <= INLINE_LIMIT_BYTES and inline_total + size <= BATCH_INLINE_BUDGET
        inline_total += size if small else 0
        if not small and ref_bytes and ref_bytes + size > REF_BYTES_PER_PART:
            parts.append(([], []))
            ref_bytes = 0
        ref_bytes += 0 if small else size
        parts[-1][0].append(index)
        parts[-1][1].append(small)
    return parts


def _chunks(items: list[SubcallItem]) -> list[list[SubcallItem]]:
    """Items split into updates that each stay under the payload budgets."""
    chunks: list[list[SubcallItem]] = [[]]
    inline = payload = 0
    for item in items:
        size = len(item.model_dump_json())
        text = len(item.text.encode()) if item.text is not None else 0
        current = chunks[-1]
        full = len(current) >= MAX_BATCH_ITEMS or inline + text > BATCH_INLINE_BUDGET or payload + size > BATCH_PAYLOAD_BUDGET
        if current and full:
            chunks.append([])
            inline = payload = 0
        chunks[-1].append(item)
        inline += text
        payload += size
    return chunks


def valid_text(text: str) -> str:
    """`text` as valid UTF-8. Guest strings arrive as they were, lone
    surrogates included (the codec passes them through), and neither the
    data converter nor the store can encode those: each becomes its escape
    (backslashreplace), so the model sees what its code produced."""
    try:
        text.encode()
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()


def _text(name: str, value: Any) -> str:
    if isinstance(value, str):
        return valid_text(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    raise TypeError(f"{name} must be a str, got {type(value).__name__}")


def _sequence(name: str, value: Any) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list of str, got {type(value).__name__}")
    return list(value)


def _context_value(value: Any) -> str | list[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError("context= must be a str or a list of str")


def _cause(exc: BaseException) -> str:
    inner = exc
    while getattr(inner, "cause", None) is not None:
        inner = inner.cause  # type: ignore[assignment]
    return str(inner) or type(inner).__name__
