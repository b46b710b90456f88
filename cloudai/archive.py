"""The log archive of one attempt, written to the store in chunks while the task runs (memory flat in the
log's length). Chunks are keyed by their first line's number (the log bus's seq), so a retried chunk replaces
itself; the store compresses them. While the store is down lines wait in a bounded buffer; past it, the archive
resumes from Docker's log (the source of truth) once the container has ended.

The live stream in Redis is trimmed only up to what the archive holds (:meth:`Archiver.floor`), so a follower
that falls behind the stream's window reads the rest from here, and no line is only in a trimmed stream."""

from __future__ import annotations

import itertools
import logging
import threading
from bisect import bisect_right
from collections.abc import Iterable

from cloudai.errors import AttemptFenced, StoreUnavailable
from cloudai.lines import archive_line, archive_lines, archived_lines
from cloudai.logbudget import LogBudget
from cloudai.logevents import LineBatch, LogEnd, LogLine
from cloudai.logs import LogBus
from cloudai.store import TaskStore
from cloudai.store.base import LOG_CHUNK_BYTES, LOG_CHUNK_LINES

log = logging.getLogger(__name__)

CHUNK_LINES = LOG_CHUNK_LINES  # a chunk is written once it has this many lines...
CHUNK_BYTES = LOG_CHUNK_BYTES  # ...or about this much text...
CHUNK_SECONDS = 5.0  # ...or its first line waited this long
MAX_BUFFER = 100_000  # lines held while the store is down; past this, Docker's log fills the gap at the end
MAX_BUFFER_BYTES = 64 * 1024 * 1024  # ...or this much text


class Archiver:
    """Appends an attempt's lines (``seq``, text, timestamp) to the store, fenced by its execution id. A thread
    of its own writes the chunks, so a store that hangs or is down never holds up the log stream, cancel or
    timeout; ``fenced`` turns True once the store refuses a chunk (another attempt is current)."""

    def __init__(self, store: TaskStore, task_id: str, execution: str | None) -> None:
        self.store = store
        self.task_id = task_id
        self.execution = execution
        self._buf: list[str] = []
        self._buf_bytes = 0
        self._first = 0  # seq of _buf[0]
        self._written: int | None = None  # the last seq written to the store
        self.gap_from: int | None = None  # first seq not archived, once the buffer overflowed
        self.gapped = False  # a gap happened (the rest of the log may need the stream's lines too)
        self.fenced = False
        # the attempt's log budget as supervision began: Docker's log, read again to fill a gap, is mapped to the
        # log's lines through a copy of it (cloudai.logbudget.Replay)
        self.budget_start: LogBudget | None = None
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

    def floor(self) -> int | None:
        """The last line the store is known to hold of what this archiver was given: the log bus may trim the
        stream up to it. None: no bound (nothing given yet, or the buffer overflowed and Docker's log will fill
        the archive in: the stream is not kept for it)."""
        with self._lock:
            if self.gap_from is not None:
                return None
            if self._buf:
                return self._first - 1
            return self._written

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

    def _overflow(self) -> None:
        """Called with ``_lock`` held: the store is away for too long; Docker's log fills the gap at the end."""
        log.warning("task %s: the store is unreachable; the archive resumes from Docker's log at the end",
                    self.task_id)
        self.gap_from = self._first
        self.gapped = True
        self._buf = []
        self._buf_bytes = 0

    def add(self, seq: int, text: str, ts: str) -> None:
        with self._lock:
            if self.gap_from is not None:
                return
            if not self._buf:
                self._first = seq
            elif seq != self._first + len(self._buf):  # not contiguous: Docker's log fills it at the end
                self.gap_from = self._first
                self.gapped = True
                self._buf = []
                self._buf_bytes = 0
                return
            self._buf.append(archive_line(text, ts))
            self._buf_bytes += len(self._buf[-1])
            self._ensure_thread()
            if len(self._buf) >= MAX_BUFFER or self._buf_bytes >= MAX_BUFFER_BYTES:
                self._overflow()
            elif len(self._buf) >= CHUNK_LINES or self._buf_bytes >= CHUNK_BYTES:
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
                added = archive_lines(lines)
                self._buf += added
                self._buf_bytes += sum(map(len, added))
                self._ensure_thread()
                if self._buf_bytes >= MAX_BUFFER_BYTES:
                    self._overflow()
                elif len(self._buf) >= CHUNK_LINES or self._buf_bytes >= CHUNK_BYTES:
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
                    first = self._first
                    head = self._buf[:CHUNK_LINES]
                    # a chunk of at most CHUNK_BYTES of text (at least one line), cut at C speed
                    count = max(1, bisect_right(list(itertools.accumulate(map(len, head))), CHUNK_BYTES))
                    chunk = head[:count]
                if not self.store.append_log(self.task_id, first, chunk, self.execution):
                    with self._lock:
                        self._buf = []
                        self._buf_bytes = 0
                    raise AttemptFenced(self.task_id, self.execution or "", "the log archive")
                with self._lock:
                    if self._first == first and self.gap_from is None:  # a gap may have reset the buffer
                        del self._buf[: len(chunk)]
                        self._buf_bytes -= sum(map(len, chunk))
                        self._first += len(chunk)
                        self._written = first + len(chunk) - 1


def archive_batch(store: TaskStore, task_id: str, after_seq: int) -> LineBatch | None:
    """The archived lines of the chunk holding line ``after_seq + 1`` (or the next chunk), from it on, as a
    batch; None past the archive's end. What followers read once the stream has expired or been trimmed past
    them: one chunk in memory at a time."""
    chunk = store.read_log_chunk(task_id, after_seq)
    if chunk is None or not chunk[1]:
        return None
    first, lines = chunk
    return archived_lines(lines, after_seq, first)


def archive_stream(store: TaskStore, bus: LogBus, task_id: str, execution: str | None = None,
                   upto: int | None = None) -> int:
    """Append to the archive the lines the live stream holds beyond the archive's last line (up to ``upto``), in
    chunks: a lost task's log (no worker finished it), or what a worker that restarted had not archived yet.
    Returns how many lines it added."""
    info = store.log_info(task_id)
    have = info.last_line if info is not None else 0
    cursor = bus.cursor(task_id, have)
    pending: list[str] = []
    first = have + 1
    added = 0
    done = False
    while not done:
        events, cursor = bus.read(task_id, cursor, have, None, 50)
        if not events:
            break
        for event in events:
            if isinstance(event, LogEnd) or (upto is not None and isinstance(event, LogLine) and event.seq > upto):
                done = True
                break
            if event.seq != first + len(pending):  # trimmed before it was archived: keep the numbering
                added += _append(store, task_id, first, pending, execution)
                pending, first = [], event.seq
            pending.append(archive_line(event.text, event.ts))
            have = event.seq
        if len(pending) >= CHUNK_LINES or sum(map(len, pending)) >= CHUNK_BYTES:
            added += _append(store, task_id, first, pending, execution)
            first, pending = first + len(pending), []
    added += _append(store, task_id, first, pending, execution)
    if info is None and not added:
        store.save_log(task_id, [])  # an empty log is an archive too: the task has one
    return added


def _append(store: TaskStore, task_id: str, first: int, lines: list[str], execution: str | None) -> int:
    if lines and not store.append_log(task_id, first, lines, execution):
        raise AttemptFenced(task_id, execution or "", "the log archive")
    return len(lines)
