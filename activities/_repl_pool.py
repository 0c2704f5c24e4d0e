"""Live REPL sessions kept on a worker between the cells of a run.

A run's next cell is warm when this worker still holds the session whose state
is the snapshot the cell starts from; otherwise a fresh session loads the
context and restores that snapshot from object storage (any worker can).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import structlog

from sandbox_wasm import ReplSession, SandboxLimits

log = structlog.get_logger(__name__)


@dataclass
class LiveRepl:
    session: ReplSession
    limits: SandboxLimits
    snapshot_key: str | None
    """The snapshot this session's state equals (None: fresh, no cell run)."""
    host: dict[str, Any] = field(default_factory=dict)
    """Host functions of the cell being run; swapped per cell."""


class ReplPool:
    """At most `size` live sessions, least recently used closed first."""

    def __init__(self, size: int = 8) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._idle: OrderedDict[str, LiveRepl] = OrderedDict()

    def checkout(
        self,
        workflow_id: str,
        snapshot_key: str | None,
        limits: SandboxLimits,
        start: Callable[[LiveRepl], None],
    ) -> tuple[LiveRepl, bool]:
        """A session in the state `snapshot_key`; True when it was warm."""
        with self._lock:
            live = self._idle.pop(workflow_id, None)
        if live is not None and live.snapshot_key == snapshot_key and live.limits == limits:
            return live, True
        if live is not None:
            live.session.close()
        host: dict[str, Any] = {}
        # The session calls whichever host functions the current cell installed.
        functions = {name: _forward(host, name) for name in _HOST_NAMES}
        live = LiveRepl(session=ReplSession(limits=limits, host_functions=functions), limits=limits, snapshot_key=None, host=host)
        start(live)
        return live, False

    def checkin(self, workflow_id: str, live: LiveRepl) -> None:
        evicted: list[LiveRepl] = []
        with self._lock:
            old = self._idle.pop(workflow_id, None)
            if old is not None and old is not live:
                evicted.append(old)
            self._idle[workflow_id] = live
            while len(self._idle) > self._size:
                evicted.append(self._idle.popitem(last=False)[1])
        for e in evicted:
            e.session.close()

    def discard(self, live: LiveRepl) -> None:
        live.session.close()

    def close(self) -> None:
        with self._lock:
            lives, self._idle = list(self._idle.values()), OrderedDict()
        for live in lives:
            live.session.close()


_HOST_NAMES = ("llm_query", "llm_query_batched", "rlm_query", "rlm_query_batched", "FINAL", "FINAL_VAR")


def _forward(host: dict[str, Any], name: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return host[name](*args, **kwargs)

    call.__name__ = name
    return call
