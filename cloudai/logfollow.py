"""Following a task's log: history, then the live tail, with no gap and no duplicate; the archive for the lines
the stream no longer holds (trimmed to its window while the task runs, or the whole stream once it expired),
read chunk by chunk. :class:`LogFollow` is the state machine without I/O; :func:`follow_batches` drives it on the
sync :class:`~cloudai.logs.LogBus` (the CLI in direct mode); the master drives it on ``redis.asyncio``
(:mod:`cloudai.server.logstream`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

from cloudai.errors import RedisUnavailable
from cloudai.logevents import LineBatch, LogEnd, LogEvent, LogLine
from cloudai.logs import LogBus

BLOCK_MS = 1000  # one XREAD BLOCK; a follower looks at its viewer (a key press, a closed connection) this often
# an archive goes out in batches of at most this many lines (one chunk of the store's at a time, in memory), so
# that a viewer prints (and the master's client decodes) the first while the next is read, and a key press stops
# `monitor` between two
ARCHIVE_BATCH_LINES = 10_000
IDLE_CHECK_S = 2.0  # with nothing new for this long, ask the store whether the task ended without a marker

FollowStep = tuple[str, Any]


class LogFollow:
    """The log-following state machine, without I/O (sans-IO): seq and cursor, idle and reconnect timers, and
    what to ask Redis or the store next. :meth:`steps` is a generator of ``(kind, argument)`` requests:

    - ``("cursor", seq)`` -> send :meth:`LogBus.cursor`; ``("read", (cursor, seq, block_ms))`` -> send the
      ``(events, cursor)`` of :meth:`LogBus.read`; a :class:`RedisUnavailable` from either is thrown in instead;
    - ``("end_of_task", None)`` -> the store's end marker or None; ``("exists", None)`` -> whether the stream
      exists; ``("last_entry", None)`` -> :meth:`LogBus.last_entry`; ``("archive", seq)`` -> the archived lines
      of the store's chunk holding line ``seq + 1`` (or the next chunk) from there on, as a :class:`LineBatch`
      (:func:`cloudai.archive.archive_batch`), or None past the archive's end;
    - ``("wait", (exc, seconds))``: Redis is unreachable, sleep and tell the viewer; ``("emit", batch)``: hand
      this batch of events to the viewer (an empty one while following: nothing arrived during one block).

    :func:`follow_batches` drives it with blocking calls (the CLI); the master drives the same steps with
    asyncio (``cloudai.server.logstream``), so both follow a log the same way."""

    def __init__(self, after_seq: int = 0, follow: bool = True, reconnect_for_s: float = 60.0) -> None:
        self.start_seq = after_seq
        self.seq = after_seq  # the last line handed over
        self.cursor: str | None = None  # the last stream entry read
        self.follow = follow
        self.reconnect_for_s = reconnect_for_s
        self.ended = False

    def take(self, events: Sequence[LogEvent]) -> Sequence[LogEvent]:
        """The batch a read's events make: lines after ``seq`` in order (a note where trimming left a gap),
        and the end marker last. The one place where events read from the stream are interpreted."""
        if isinstance(events, LineBatch) and events and events.first == self.seq + 1:
            self.seq = events.first + len(events) - 1  # the common case, as one batch of columns: handed on as is
            return events
        batch: list[LogEvent] = []
        for event in events:
            if isinstance(event, LogEnd):
                batch.append(event)
                self.ended = True
                return batch
            if event.seq <= self.seq:
                continue
            if event.seq > self.seq + 1:  # neither the stream nor the archive has them (the archive lags)
                batch.append(LogLine(self.seq + 1, f"[cloudai] {event.seq - self.seq - 1} earlier lines were "
                                     "trimmed from the live log; `cloudai logs` shows them once the task ends"))
            self.seq = event.seq
            batch.append(event)
        return batch

    def _archive(self, upto: int | None) -> Generator[FollowStep, Any, None]:
        """Hand over the archived lines after ``seq`` up to line ``upto`` (None: to the archive's end), a chunk
        of the store's at a time. A hole in the archive is noted (once the stream expired), or left to
        :meth:`take` (while the stream holds the lines after it)."""
        while upto is None or self.seq < upto:
            batch: LineBatch | None = yield ("archive", self.seq)
            if not batch:
                return
            if upto is not None:
                batch = batch[: max(0, upto - batch.first + 1)]
            if not batch or (batch.first > self.seq + 1 and upto is not None):
                return
            if batch.first > self.seq + 1:
                yield ("emit", [LogLine(self.seq + 1, f"[cloudai] {batch.first - self.seq - 1} lines are missing "
                                        "from the archive")])
            self.seq = batch.first + len(batch) - 1
            for start in range(0, len(batch), ARCHIVE_BATCH_LINES):
                yield ("emit", batch[start:start + ARCHIVE_BATCH_LINES])

    def steps(self) -> Generator[FollowStep, Any, None]:
        """The requests, in order (see the class docstring)."""
        idle_since = time.monotonic()
        broken_since: float | None = None
        # the first read does not wait: a log with nothing to read (its stream expired, or the task has not
        # printed yet) asks the store at once, so `logs -f` of a task that ended long ago shows its archive now
        quick = True
        while True:
            try:
                if self.cursor is None:
                    self.cursor = yield ("cursor", self.seq)
                block = BLOCK_MS if self.follow and not quick else None
                events, self.cursor = yield ("read", (self.cursor, self.seq, block))
                broken_since = None
            except RedisUnavailable as exc:
                now = time.monotonic()
                broken_since = broken_since or now
                if now - broken_since > self.reconnect_for_s:
                    raise
                yield ("wait", (exc, min(1.0, self.reconnect_for_s / 10)))
                continue
            parts = _runs(events)
            for part in parts:
                first = _first_seq(part)
                if first is not None and first > self.seq + 1:
                    # the stream lacks lines this follower still needs: trimmed past them (the archive has them:
                    # the stream is never trimmed past what it holds), or, inside the stream, lost by a Redis
                    # failover (writes the old primary had not replicated; the worker archived them): read the
                    # archive up to the next line the stream has. What the archive lacks too is noted by take()
                    yield from self._archive(first - 1)
                batch = self.take(part)
                if batch or (self.follow and len(parts) == 1):
                    yield ("emit", batch)  # an empty batch lets a viewer check for a key press while nothing arrives
                if self.ended:
                    return
            if events:
                idle_since = time.monotonic()
                quick = False
                continue
            # nothing new: the stream may be gone (expired after the end) or the task may have ended without
            # a marker (its worker died): the store decides
            if self.follow and not quick and time.monotonic() - idle_since < IDLE_CHECK_S:
                continue
            quick = False
            idle_since = time.monotonic()
            end: LogEnd | None = yield ("end_of_task", None)
            if end is None:
                if not self.follow:
                    return
                continue
            if not (yield ("exists", None)):
                yield from self._archive(None)
                yield ("emit", [end])
                return
            last_seq, last = yield ("last_entry", None)
            if last_seq <= self.seq and not isinstance(last, LogEnd):
                yield ("emit", [end])
                return


def _runs(events: Sequence[LogEvent]) -> list[Sequence[LogEvent]]:
    """A read's events cut where a line does not follow the line before it (a hole inside the stream), so that
    each run's missing lines can be read from the archive first. One run in the common case."""
    if isinstance(events, LineBatch):
        return [events]  # columns of entries that follow on (cloudai.logs.parse_read)
    runs: list[Sequence[LogEvent]] = []
    start = 0
    previous: int | None = None
    for at, event in enumerate(events):
        if isinstance(event, LogLine):
            if previous is not None and event.seq > previous + 1:
                runs.append(events[start:at])
                start = at
            previous = event.seq
    runs.append(events[start:])
    return runs


def _first_seq(events: Sequence[LogEvent]) -> int | None:
    """The seq of the first line a read brought (None: no line)."""
    if isinstance(events, LineBatch):
        return events.first if events else None
    return next((e.seq for e in events if isinstance(e, LogLine)), None)


def follow_batches(bus: LogBus, task_id: str, end_of_task: Callable[[], LogEnd | None],
                   read_archive: Callable[[int], LineBatch | None], after_seq: int = 0, follow: bool = True,
                   on_reconnect: Callable[[Exception], None] | None = None,
                   reconnect_for_s: float = 60.0) -> Iterator[Sequence[LogEvent]]:
    """A task's log from line ``after_seq + 1`` in batches as Redis hands them over: history, then (with
    ``follow``) live lines until the end marker, which comes last. No gap, no duplicate; a dropped Redis
    connection is retried for ``reconnect_for_s`` and resumes after the last line seen. Once the stream has
    expired (or been trimmed past the lines wanted), the archive. ``end_of_task`` asks the store whether the task
    has finished (the end marker it would have, or None); ``read_archive(seq)`` reads the archived chunk after
    line ``seq`` (:func:`cloudai.archive.archive_batch`). Drives :class:`LogFollow` with blocking calls."""
    io: dict[str, Callable[[Any], Any]] = {
        "cursor": lambda seq: bus.cursor(task_id, seq),
        "read": lambda a: bus.read(task_id, a[0], a[1], block_ms=a[2]),
        "end_of_task": lambda _: end_of_task(),
        "exists": lambda _: bus.exists(task_id),
        "last_entry": lambda _: bus.last_entry(task_id),
        "archive": read_archive,
    }
    plan = LogFollow(after_seq, follow, reconnect_for_s).steps()
    reply: Any = None
    error: RedisUnavailable | None = None
    while True:
        try:
            kind, arg = plan.throw(error) if error is not None else plan.send(reply)
        except StopIteration:
            return
        reply, error = None, None
        if kind == "emit":
            yield arg
        elif kind == "wait":
            if on_reconnect is not None:
                on_reconnect(arg[0])
            time.sleep(arg[1])
        else:
            try:
                reply = io[kind](arg)
            except RedisUnavailable as exc:
                error = exc
