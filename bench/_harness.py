"""Set-up shared by the engine benchmarks: private services, a scripted model
server, a worker in this process, and reading timings out of a run's history.

Nothing here is imported by the engine; it only drives it from outside, the
way the tests do (tests/run_harness.py), plus a few timers.
"""

from __future__ import annotations

import compileall
import contextlib
import functools
import inspect
import threading
import datetime as dt
import json
import multiprocessing
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from temporalio.api.enums.v1 import EventType  # noqa: E402
from temporalio.client import WorkflowHistory  # noqa: E402

from activities.llm import ModelRegistry  # noqa: E402
from activities.settings import Settings  # noqa: E402
from cli import services  # noqa: E402
from tests.fake_llm import FakeLLM, FakeRequest  # noqa: E402
from tests.fixtures_llm import FAKE_API_KEY_ENV, FAKE_API_KEY_VALUE, FAKE_MODEL_NAMES, fake_registry  # noqa: E402
from tests.run_harness import worker_and_pool  # noqa: E402
from worker import prepare_garbage_collector  # noqa: E402

__all__ = [
    "RESULTS_DIR",
    "Services",
    "Timers",
    "compile_our_modules",
    "fake_llm_in_process",
    "fake_llm_subprocess",
    "history_timeline",
    "machine_info",
    "proc_cpu_s",
    "running_worker",
    "scripted_root",
    "split_into_files",
    "spread",
    "write_results",
]

RESULTS_DIR = ROOT / "bench" / "results"
_TURN = re.compile(r"Turn (\d+) of \d+")


# -- environment ------------------------------------------------------------

OUR_PACKAGES = ("workflows", "activities", "sandbox_wasm", "cli")


def compile_our_modules() -> dict[str, Any]:
    """Bytecode for this checkout's modules, as pip writes for what it installs.

    A reference installed with pip (rlms in its venv) starts from .pyc files;
    this editable install gets none where the environment sets
    PYTHONDONTWRITEBYTECODE=1 (this machine does), and every `rlm` command
    then compiles its ~60 modules from source (~50 ms a start). compileall
    writes them whatever that variable says; imports read them either way."""
    begun = time.perf_counter()
    # Not the guest's modules: their directory is the sandbox's (its own
    # CPython compiles them, sandbox_wasm/_bytecode.py).
    guest = re.compile(r"[/\\]guest[/\\]")
    ok = all(compileall.compile_dir(ROOT / name, quiet=1, rx=guest) for name in OUR_PACKAGES)
    ok = compileall.compile_file(ROOT / "worker.py", quiet=1) and ok
    return {"compiled": bool(ok), "seconds": round(time.perf_counter() - begun, 2),
            "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE")}


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def machine_info() -> dict[str, Any]:
    mem_total = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = round(int(line.split()[1]) / 1024)
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "mem_total_mb": mem_total,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def write_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    doc = {
        "benchmark": name,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(),
        "machine": machine_info(),
    } | payload
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def split_into_files(text: str, docs: int, folder: Path) -> list[Path]:
    """`text` cut into `docs` files of about equal size under `folder`
    (`doc000000.txt`, ...), each cut at a space: valid UTF-8, no word split."""
    step, files, at = len(text) // docs, [], 0
    for i in range(docs):
        end = len(text) if i == docs - 1 else text.find(" ", max(at, (i + 1) * step))
        end = len(text) if end < 0 else end
        files.append(folder / f"doc{i:06d}.txt")
        files[-1].write_text(text[at:end], encoding="utf-8")
        at = end
    return files


def spread(values: list[float], digits: int = 3) -> dict[str, Any]:
    """Median, min, max (and every value) of repeated measurements."""
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "runs": [round(v, digits) for v in values],
    }


def peak_rss_mb(pid: int | None = None) -> float:
    """VmHWM of a process (this one by default), in MB."""
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by a process (and its reaped children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


# -- services and worker ----------------------------------------------------


@dataclass
class Services:
    settings: Settings
    temporal_pid: int | None
    s3_pid: int | None
    startup_s: float


@contextlib.contextmanager
def private_services() -> Iterator[Services]:
    """A private Temporal dev server + S3 server in a temp dir, stopped at the end."""
    with tempfile.TemporaryDirectory(prefix="rlm-bench-") as tmp:
        for attempt in range(3):
            # Free ports are chosen, then bound by the servers: on a busy machine
            # another process may take one in between; try fresh ports again.
            settings = services.private_settings(Path(tmp) / f"data{attempt}")
            started = time.perf_counter()
            try:
                status = services.up(settings)
                break
            except services.LauncherError as exc:
                services.down(settings)
                if attempt == 2:
                    raise
                print(f"services did not start ({str(exc).splitlines()[-1].strip()}); retrying on new ports")
        startup = time.perf_counter() - started
        try:
            yield Services(settings, status.temporal.pid, status.s3.pid, startup)
        finally:
            services.down(settings)


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, models: ModelRegistry) -> AsyncIterator[tuple[Any, Any]]:
    """A real worker in this process, with its REPL pool (to force cold
    cells); its garbage collector prepared as `run_worker` does for a deployed one."""
    async with worker_and_pool(settings, models) as (client, pool):
        prepare_garbage_collector()
        yield client, pool


# -- the scripted model server -----------------------------------------------


def scripted_root(turn_replies: dict[int, str], default: str) -> Callable[[FakeRequest], str]:
    """A root-model reply chosen by the "Turn k of N" line of the last user message."""

    def reply(request: FakeRequest) -> str:
        turns = _TURN.findall(request.last_user_text)
        turn = int(turns[-1]) if turns else 0
        return turn_replies.get(turn, default)

    return reply


@contextlib.contextmanager
def fake_llm_in_process() -> Iterator[FakeLLM]:
    os.environ[FAKE_API_KEY_ENV] = FAKE_API_KEY_VALUE
    with FakeLLM(api_key=FAKE_API_KEY_VALUE, models=list(FAKE_MODEL_NAMES)) as fake:
        yield fake


def _serve_fake(turn_replies: dict[int, str], default: str, sub_reply: str, sub_delay_s: float, conn) -> None:
    fake = FakeLLM(api_key=FAKE_API_KEY_VALUE, models=list(FAKE_MODEL_NAMES)).start()
    fake.add_rule(None, scripted_root(turn_replies, default), model="fake-root")
    fake.add_rule(None, sub_reply, model="fake-sub", delay_s=sub_delay_s, name="sub")
    conn.send(fake.url)
    conn.recv()  # until the parent says stop (or dies)
    conn.send({"requests": fake.count(), "sub": fake.count("sub")})
    fake.stop()


@contextlib.contextmanager
def fake_llm_subprocess(
    turn_replies: dict[int, str], default: str, *, sub_reply: str = "ok", sub_delay_s: float = 0.0
) -> Iterator[tuple[str, Callable[[], dict[str, int]]]]:
    """The scripted server in its own process, so its CPU does not compete with
    the worker for this process's GIL. Yields (url, stop-and-count)."""
    os.environ[FAKE_API_KEY_ENV] = FAKE_API_KEY_VALUE
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_fake, args=(turn_replies, default, sub_reply, sub_delay_s, child), daemon=True)
    proc.start()
    counts: dict[str, int] = {}

    def stop() -> dict[str, int]:
        if not counts:
            parent.send("stop")
            counts.update(parent.recv())
        return counts

    try:
        if not parent.poll(60):
            raise RuntimeError("the scripted model server process did not start")
        url = parent.recv()
        yield url, stop
    finally:
        with contextlib.suppress(OSError, EOFError):
            stop()
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def registry(url_or_fake: FakeLLM | str, **overrides: object) -> ModelRegistry:
    return fake_registry(url_or_fake, **overrides)


# -- timers around engine methods (wrapped from outside, never edited) --------


class Timers:
    """Total seconds and call counts of wrapped functions, from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.totals: dict[str, list[float]] = {}
        self._undo: list[Callable[[], None]] = []

    def add(self, label: str, seconds: float) -> None:
        with self._lock:
            self.totals.setdefault(label, []).append(seconds)

    def wrap(self, owner: Any, attr: str, label: str | None = None) -> None:
        label = label or f"{getattr(owner, '__name__', owner)}.{attr}"
        original = getattr(owner, attr)
        if inspect.iscoroutinefunction(original):

            @functools.wraps(original)
            async def timed_async(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return await original(*args, **kwargs)
                finally:
                    self.add(label, time.perf_counter() - start)

            setattr(owner, attr, timed_async)
        else:

            @functools.wraps(original)
            def timed(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    self.add(label, time.perf_counter() - start)

            setattr(owner, attr, timed)
        self._undo.append(lambda: setattr(owner, attr, original))

    def reset(self) -> None:
        with self._lock:
            self.totals = {}

    def summary(self, digits: int = 4) -> dict[str, dict[str, float]]:
        with self._lock:
            return {
                k: {"calls": len(v), "total_s": round(sum(v), digits), "mean_ms": round(1000 * sum(v) / len(v), 2)}
                for k, v in sorted(self.totals.items())
            }

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


# -- history ------------------------------------------------------------------


def _ts(event) -> float:
    return event.event_time.seconds + event.event_time.nanos / 1e9


@dataclass
class Step:
    """One activity (or workflow task) of a run, times in seconds since the run started."""

    kind: str
    scheduled: float
    started: float
    closed: float

    @property
    def queue_s(self) -> float:
        return self.started - self.scheduled

    @property
    def run_s(self) -> float:
        return self.closed - self.started


def history_timeline(history: WorkflowHistory) -> tuple[list[Step], list[Step], float]:
    """(activities, workflow tasks, total seconds) from a run's history, in event order."""
    events = list(history.events)
    t0 = _ts(events[0])
    activities: dict[int, Step] = {}
    tasks: dict[int, Step] = {}
    for ev in events:
        t = _ts(ev) - t0
        et = ev.event_type
        if et == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            name = ev.activity_task_scheduled_event_attributes.activity_type.name
            activities[ev.event_id] = Step(name, t, float("nan"), float("nan"))
        elif et == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            activities[ev.activity_task_started_event_attributes.scheduled_event_id].started = t
        elif et == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            activities[ev.activity_task_completed_event_attributes.scheduled_event_id].closed = t
        elif et == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED:
            activities[ev.activity_task_failed_event_attributes.scheduled_event_id].closed = t
        elif et == EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED:
            tasks[ev.event_id] = Step("workflow_task", t, float("nan"), float("nan"))
        elif et == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
            tasks[ev.workflow_task_started_event_attributes.scheduled_event_id].started = t
        elif et == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            tasks[ev.workflow_task_completed_event_attributes.scheduled_event_id].closed = t
    total = _ts(events[-1]) - t0
    return list(activities.values()), list(tasks.values()), total


def activity_results(history: WorkflowHistory, converter, activity_name: str, result_type: type) -> list[Any]:
    """Decoded results of every completed activity of one type, in order."""
    names = {}
    out = []
    for ev in history.events:
        if ev.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            names[ev.event_id] = ev.activity_task_scheduled_event_attributes.activity_type.name
        elif ev.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            attrs = ev.activity_task_completed_event_attributes
            if names.get(attrs.scheduled_event_id) == activity_name:
                payload = attrs.result.payloads[0]
                out.append(converter.payload_converter.from_payloads([payload], [result_type])[0])
    return out
