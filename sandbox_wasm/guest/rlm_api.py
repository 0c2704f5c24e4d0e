"""Names the model's code may call: host-function stubs, SHOW_VARS, a safe sleep.

Every stub forwards to the host function of the same name through the channel
and blocks until the host answers. Keeping the signatures fixed here (not on
the host) means the model sees the documented API whatever the host registers.
"""

import builtins
import time
import types

from rlm_channel import ChannelRefused, FrameTooLarge
from rlm_codec import CodecError, CodecLimit

STANDARD_NAMES = ("llm_query", "llm_query_batched", "rlm_query", "rlm_query_batched",
                  "FINAL", "FINAL_VAR", "SHOW_VARS", "document", "document_names")


class HostCallError(Exception):
    """A host function failed, or is not available in this session."""


class ToolError(HostCallError):
    """A custom tool raised; the message is the tool's."""


# Shown to the model as plain `HostCallError` / `ToolError`, builtins of this REPL.
HostCallError.__module__ = ToolError.__module__ = "builtins"


class CellClock:
    """Time left in the running cell, excluding time spent waiting on the host."""

    def __init__(self):
        self.timeout = float("inf")
        self.started = time.monotonic()
        self.paused = 0.0

    def start(self, timeout):
        self.timeout = timeout
        self.started = time.monotonic()
        self.paused = 0.0

    def remaining(self):
        return self.timeout - (time.monotonic() - self.started - self.paused)


# Taken at import, once per interpreter: a REPL started from a boot image
# installs its sleep over the imaged REPL's, and must not wrap it.
_REAL_SLEEP = time.sleep


def install_safe_sleep(clock):
    """Replace time.sleep: a blocking WASI sleep cannot be interrupted by the
    host's deadline, so a sleep longer than the cell's remaining time fails
    at once instead of holding the worker."""
    real_sleep = _REAL_SLEEP

    def sleep(secs):
        secs = float(secs)
        if secs < 0:
            raise ValueError("sleep length must be non-negative")
        left = clock.remaining()
        if secs > left:
            raise TimeoutError(
                "time.sleep(%g) would outlast this cell's time limit (%.1f s left of %g s); "
                "sleeping is not useful in this sandbox" % (secs, max(left, 0.0), clock.timeout))
        real_sleep(secs)

    sleep.__doc__ = real_sleep.__doc__
    time.sleep = sleep


def build_api(channel, user_globals, registered, clock, context_docs=tuple, docs=None):
    """Return {name: function} for the standard names plus extra host functions.
    `context_docs()` gives the loaded context's documents (a tuple the code
    cannot change), for `document(name)`; `docs` maps an extra host function
    (a tool) to the docstring its stub carries."""

    def call(name, /, *args, **kwargs):  # positional-only: a tool may take `name=`
        if name not in registered:
            raise HostCallError(
                "%s() is not available in this session: the host registered no function "
                "named %r" % (name, name))
        began = time.monotonic()
        try:
            reply = channel.request(["call", name, list(args), kwargs])
        except CodecLimit as exc:  # a value of a type it takes, but too large or too many
            raise ValueError("%s(): %s" % (name, exc)) from None
        except CodecError as exc:
            raise TypeError("%s(): %s" % (name, exc)) from None
        except FrameTooLarge as exc:
            raise ValueError("%s(): %s" % (name, exc)) from None
        except ChannelRefused as exc:  # the host's reason: nothing was called
            raise HostCallError("%s(): %s; the call was not made" % (name, exc)) from None
        finally:
            clock.paused += time.monotonic() - began
        if reply[0] == "ok":
            return reply[1]
        raise (ToolError if reply[2:] == ["ToolError"] else HostCallError)(reply[1])

    def llm_query(prompt, model=None):
        """Ask a sub-model one prompt; returns its reply (str)."""
        return call("llm_query", prompt, model=model)

    def llm_query_batched(prompts, model=None):
        """Ask a sub-model many prompts in parallel; returns replies in order (list[str])."""
        return call("llm_query_batched", list(prompts), model=model)

    def rlm_query(question, context=None, model=None):
        """Run a child RLM on `question` over `context`; returns its answer (str)."""
        return call("rlm_query", question, context=context, model=model)

    def rlm_query_batched(questions, contexts=None, model=None):
        """Run child RLMs in parallel; returns answers in order (list[str])."""
        if contexts is not None:
            contexts = list(contexts)
        return call("rlm_query_batched", list(questions), contexts=contexts, model=model)

    def FINAL(answer):  # noqa: N802 - the name is part of the model-facing API
        """Give the final answer (converted to str); the run ends after this cell."""
        return call("FINAL", str(answer))

    def FINAL_VAR(name):  # noqa: N802
        """Give the value of the REPL variable called `name` as the final answer."""
        if not isinstance(name, str):
            raise TypeError("FINAL_VAR expects the variable's name as a string, "
                            "e.g. FINAL_VAR('answer'), not a %s" % type(name).__name__)
        key = name.strip().strip("'\"")
        if key not in user_globals:
            raise NameError("FINAL_VAR(%r): no variable named %r exists in the REPL; "
                            "assign it first or call FINAL(value)" % (name, key))
        return call("FINAL_VAR", key, str(user_globals[key]))

    def SHOW_VARS():  # noqa: N802
        """List the REPL's user variables with their type and size."""
        lines = []
        for key, value in user_globals.items():
            if key.startswith("_") or key in api or isinstance(value, types.ModuleType):
                continue
            try:
                size = ", len %s" % format(len(value), ",")
            except Exception:
                size = ""
            lines.append("%s: %s%s" % (key, type(value).__name__, size))
        return "\n".join(lines) if lines else "(no user variables)"

    # Names are asked of the host once per loaded context (they never change).
    names_of = [None, None, None]  # docs tuple, names list, {name: index}

    def _names():
        docs = context_docs()
        if names_of[0] is not docs:
            names = list(call("document_names"))
            names_of[:] = [docs, names, {n: i for i, n in enumerate(names)}]
        return names_of[1], names_of[2]

    def document_names():
        """Names of the documents (their file paths), in the order of `context`."""
        return list(_names()[0])

    def document(name):
        """The text of the document called `name` (a name from document_names())."""
        if not isinstance(name, str):
            raise TypeError("document() takes a document's name (str), e.g. document(%r); "
                            "use context[i] for the i-th document" % "invoices/2024-01.pdf")
        names, index = _names()
        if not names:
            raise KeyError("the documents of this context have no names (they were given as "
                           "texts, not files): use context[i]")
        if name not in index:
            import difflib

            close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
            hint = ("; did you mean %s?" % ", ".join(repr(c) for c in close)) if close else ""
            raise KeyError("no document named %r among the %s documents%s (document_names() lists them)"
                           % (name, format(len(names), ","), hint))
        return context_docs()[index[name]]

    api = {f.__name__: f for f in (llm_query, llm_query_batched, rlm_query,
                                    rlm_query_batched, FINAL, FINAL_VAR, SHOW_VARS,
                                    document, document_names)}
    for extra in registered:
        if extra not in api:
            api[extra] = _extra_stub(call, extra, (docs or {}).get(extra))
    builtins.HostCallError, builtins.ToolError = HostCallError, ToolError
    return api


def _extra_stub(call, name, doc=None):
    def stub(*args, **kwargs):
        return call(name, *args, **kwargs)

    stub.__name__ = stub.__qualname__ = name
    stub.__doc__ = doc if isinstance(doc, str) else "Host function %r." % name
    return stub
