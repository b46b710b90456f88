"""The log archive of one attempt, written to the store in chunks while the task runs (memory flat in the
log's length). Chunks are keyed by their first line's number (the log bus's seq), so a retried chunk replaces
itself. While the store is down lines wait in a bounded buffer; past it, the archive resumes from Docker's own
log (the source of truth) once the container has ended."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from cloudai.errors import AttemptFenced, StoreUnavailable
from cloudai.logs import archive_line
from cloudai.store import TaskStore

log = logging.getLogger(__name__)

CHUNK_LINES = 2000
CHUNK_SECONDS = 2.0
MAX_BUFFER = 100_000  # lines held while the store is down; past this, Docker's log fills the gap at the end


class Archiver:
    """Appends an attempt's lines (``seq``, text, timestamp) to the store, fenced by its execution id."""

    def __init__(self, store: TaskStore, task_id: str, execution: str | None) -> None:
        self.store = store
        self.task_id = task_id
        self.execution = execution
        self._buf: list[str] = []
        self._first = 0  # seq of _buf[0]
        self._since = time.monotonic()
        self.gap_from: int | None = None  # first seq not archived, once the buffer overflowed
        self.retry_at = 0.0

    def add(self, seq: int, text: str, ts: str) -> None:
        if self.gap_from is not None:
            return
        if not self._buf:
            self._first, self._since = seq, time.monotonic()
        elif seq != self._first + len(self._buf):  # not contiguous: write what we have first
            self.flush_if_due(force=True)
            if self._buf:
                self.gap_from = self._first
                self._buf = []
                return
            self._first, self._since = seq, time.monotonic()
        self._buf.append(archive_line(text, ts))
        if len(self._buf) >= MAX_BUFFER:
            log.warning("task %s: the store is unreachable; the archive resumes from Docker's log at the end",
                        self.task_id)
            self.gap_from = self._first
            self._buf = []

    def add_many(self, lines: Iterable[tuple[int, str, str]]) -> None:
        for seq, text, ts in lines:
            self.add(seq, text, ts)

    def flush_if_due(self, force: bool = False) -> None:
        """Write the buffer when a chunk is full or old; a store outage is waited out (lines stay buffered)."""
        if not self._buf or time.monotonic() < self.retry_at:
            return
        if not force and len(self._buf) < CHUNK_LINES and time.monotonic() - self._since < CHUNK_SECONDS:
            return
        try:
            self.flush()
        except StoreUnavailable as exc:
            log.warning("task %s: archive chunk waits for the store (%s)", self.task_id, exc)
            self.retry_at = time.monotonic() + 2.0

    def flush(self) -> None:
        """Write the buffered lines now; raises StoreUnavailable (kept) or AttemptFenced (dropped)."""
        while self._buf:
            chunk = self._buf[:CHUNK_LINES]
            if not self.store.append_log(self.task_id, self._first, chunk, self.execution):
                self._buf = []
                raise AttemptFenced(self.task_id, self.execution or "", "the log archive")
            del self._buf[:CHUNK_LINES]
            self._first += len(chunk)
            self._since = time.monotonic()
