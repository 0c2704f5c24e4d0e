"""The state a session goes back to after a trap: its last snapshot or restore.

The state pickle is kept on the host (it is small: large values are records).
The records, the large str/bytes values, can together be as large as the
guest's own memory; a worker's idle sessions each held a copy of them beside
the guest itself, outside the guest memory budget. Once the caller has
stored them durably it says where to read them back (`keep_records_elsewhere`),
and the session drops its copies: they are read again only for a restart.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

RecordSource = Callable[[list[str]], Mapping[str, bytes]]
"""Reads the named records back: record name -> bytes."""


class RecordsUnavailable(Exception):
    """The saved records could not be read back for a restart (storage down).
    Not a SandboxError: the state is fine, only out of reach for now, so the
    caller fails the step to retry it rather than start the REPL empty."""


class SavedState:
    """The last saved state: its pickle, and its records held or read back."""

    def __init__(self) -> None:
        self.data: bytes | None = None
        self._records: dict[str, bytes | None] = {}  # None: read from the source when needed
        self._source: RecordSource | None = None

    @property
    def names(self) -> Collection[str]:
        """Record names the state refers to (the guest may refer to them again
        without sending their bytes)."""
        return self._records.keys()

    @property
    def held_record_bytes(self) -> int:
        """Bytes of records held here (not dropped)."""
        return sum(len(value) for value in self._records.values() if value is not None)

    def replace(self, data: bytes, records: Mapping[str, bytes]) -> None:
        """A state restored from outside, all its records given."""
        self.data, self._records, self._source = data, dict(records), None

    def unchanged(self, data: bytes, refs: list[str], new_records: Mapping[str, bytes]) -> bool:
        return not new_records and data == self.data and set(refs) == set(self._records)

    def update(self, data: bytes, refs: list[str], new_records: Mapping[str, bytes]) -> None:
        """A snapshot taken: `refs` name its records, the new ones given,
        the others already held (or readable from the source)."""
        self._records = {d: new_records[d] if d in new_records else self._records[d] for d in refs}
        self.data = data

    def clear(self) -> None:
        self.data, self._records, self._source = None, {}, None

    def keep_records_elsewhere(self, source: RecordSource) -> None:
        """Every record of the state is stored where `source` reads it: drop the copies."""
        self._records = dict.fromkeys(self._records)
        self._source = source

    def records(self) -> dict[str, bytes]:
        """All the records, those dropped read back from the source."""
        missing = [d for d, value in self._records.items() if value is None]
        if not missing:
            return dict(self._records)  # type: ignore[arg-type] - none is None
        assert self._source is not None  # only keep_records_elsewhere drops them
        try:
            fetched = self._source(missing)
            out = {d: value if value is not None else fetched[d] for d, value in self._records.items()}
        except Exception as exc:
            raise RecordsUnavailable(
                f"the REPL's saved values could not be read back for a restart: {type(exc).__name__}: {exc}"
            ) from exc
        if not all(isinstance(value, bytes) for value in out.values()):
            raise RecordsUnavailable("the REPL's saved values could not be read back: the source sent no bytes")
        return out  # type: ignore[return-value]
