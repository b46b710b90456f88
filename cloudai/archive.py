"""The log archive of one attempt, written to the store in chunks while the task runs (memory flat in the
log's length). Chunks are keyed by their first line's number (the log bus's seq), so a retried chunk replaces
itself. While the store is down lines wait in a bounded buffer; past it, the archive resumes from Docker's own
log (the source of truth) once the container has ended."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from cloudai.errors import AttemptFenced, StoreUnavailable
from cloudai.lines import archive_line, archive_lines
from cloudai.store import TaskStore

log = logging.getLogger(__name__)

CHUNK_LINES = 2000
CHUNK_SECONDS = 2.0
MAX_BUFFER = 100_000  # lines held while the store is down; past this, Docker's log fills the gap at the end


class Archiver:
    """Appends an attempt's lines (``seq``, text, timestamp) to the store, fenced by its execution id. A thread
    of its own writes the chunks, so a store that hangs or is down never holds up the log stream, cancel or
    timeout; ``fenced`` turns True once the store refuses a chunk (another attempt is current)."""

    def __init__(self, store: TaskStore, task_id: str, execution: str | None) -> None:
        self.store = store
        self.task_id = task_id
        self.execution = execution
        self._buf: list[str] = []
        self._first = 0  # seq of _buf[0]
        self.gap_from: int | None = None  # first seq not archived, once the buffer overflowed
        self.fenced = False
        self._lock = threading.Lock()
        self._flushing = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False

    def start(self) -> Archiver:
        """Write chunks in the background from the first line on (a task that prints nothing costs no thread)."""
        self._started = True
        return self

    def _ensure_thread(self) -> None:
        """Called with ``_lock`` held, when lines arrive."""
        if self._thread is None and self._started and not self._closed.is_set():
            self._thread = threading.Thread(target=self._loop, daemon=True, name=f"archive-{self.task_id}")
            self._thread.start()

    def close(self) -> None:
        """Stop the background writer (what is buffered stays for :meth:`flush`)."""
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(60)

    def _loop(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(CHUNK_SECONDS)
            self._wake.clear()
            if self._closed.is_set():
                return
            try:
                self.flush()
            except StoreUnavailable as exc:
                log.warning("task %s: archive chunks wait for the store (%s)", self.task_id, exc)
                self._closed.wait(2.0)
            except AttemptFenced:
                self.fenced = True
                return
            except Exception:
                log.exception("task %s: archive chunk failed", self.task_id)
                self._closed.wait(2.0)

    def add(self, seq: int, text: str, ts: str) -> None:
        with self._lock:
            if self.gap_from is not None:
                return
            if not self._buf:
                self._first = seq
            elif seq != self._first + len(self._buf):  # not contiguous: Docker's log fills it at the end
                self.gap_from = self._first
                self._buf = []
                return
            self._buf.append(archive_line(text, ts))
            self._ensure_thread()
            if len(self._buf) >= MAX_BUFFER:
                log.warning("task %s: the store is unreachable; the archive resumes from Docker's log at the end",
                            self.task_id)
                self.gap_from = self._first
                self._buf = []
            elif len(self._buf) >= CHUNK_LINES:
                self._wake.set()

    def add_lines(self, first: int, lines: list[tuple[str, str]]) -> None:
        """Lines ``first``, ``first + 1``, ... as ``(text, ts)`` (one lock and one check for the lot)."""
        if not lines:
            return
        with self._lock:
            contiguous = not self._buf or first == self._first + len(self._buf)
            if self.gap_from is not None or not contiguous or len(self._buf) + len(lines) >= MAX_BUFFER:
                fallback = True
            else:
                fallback = False
                if not self._buf:
                    self._first = first
                self._buf += archive_lines(lines)
                self._ensure_thread()
                if len(self._buf) >= CHUNK_LINES:
                    self._wake.set()
        if fallback:  # the first line, a gap or an overflow: the line-by-line rules decide
            for n, (text, ts) in enumerate(lines):
                self.add(first + n, text, ts)

    def add_many(self, lines: Iterable[tuple[int, str, str]]) -> None:
        for seq, text, ts in lines:
            self.add(seq, text, ts)

    def flush(self) -> None:
        """Write the buffered lines now; raises StoreUnavailable (lines kept) or AttemptFenced (dropped)."""
        with self._flushing:
            while True:
                with self._lock:
                    if not self._buf:
                        return
                    first, chunk = self._first, self._buf[:CHUNK_LINES]
                if not self.store.append_log(self.task_id, first, chunk, self.execution):
                    with self._lock:
                        self._buf = []
                    raise AttemptFenced(self.task_id, self.execution or "", "the log archive")
                with self._lock:
                    if self._first == first:  # a gap may have reset the buffer meanwhile
                        del self._buf[: len(chunk)]
                        self._first += len(chunk)
