"""One status line while a run works: turn, cells, sub-calls, tokens, cost."""

from __future__ import annotations

from typing import Any, TextIO


class ProgressPrinter:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._last = ""

    def note(self, text: str) -> None:
        self._clear()
        self._stream.write(text + "\n")
        self._stream.flush()

    def update(self, state: dict[str, Any]) -> None:
        spent = state.get("spent", {})
        line = (
            f"turn {state.get('turn')}/{state.get('max_turns')} | {state.get('phase')} | "
            f"cells {state.get('cells', 0)} | sub-calls {state.get('done_subcalls', 0)} done, "
            f"{state.get('open_subcalls', 0)} open | children {state.get('children', 0)} | "
            f"tokens {spent.get('tokens', 0):,} | ${spent.get('usd', 0.0):.4f}"
        )
        if line == self._last:
            return
        self._last = line
        if self._tty:
            self._stream.write("\r\033[K" + line)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def done(self) -> None:
        self._clear()

    def _clear(self) -> None:
        if self._tty and self._last:
            self._stream.write("\r\033[K")
            self._stream.flush()

