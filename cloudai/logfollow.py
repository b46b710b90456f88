"""Following a task's log: history, then the live tail, with no gap and no duplicate, and the archive once the
stream expired. :class:`LogFollow` is the state machine without I/O; :func:`follow_batches` drives it on the
sync :class:`~cloudai.logs.LogBus` (the CLI in direct mode); the master drives it on ``redis.asyncio``
(:mod:`cloudai.server.logstream`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

from cloudai.errors import RedisUnavailable
from cloudai.lines import archived_lines
from cloudai.logevents import LineBatch, LogEnd, LogEvent, LogLine
from cloudai.logs import LogBus

BLOCK_MS = 1000  # one XREAD BLOCK; a follower looks at its viewer (a key press, a closed connection) this often
# an archive goes out in batches of this many lines, so that a viewer prints (and the master's client decodes)
# the first while the next is encoded, and a key press stops `monitor` between two
ARCHIVE_BATCH_LINES = 10_000
IDLE_CHECK_S = 2.0  # with nothing new for this long, ask the store whether the task ended without a marker

FollowStep = tuple[str, Any]


class LogFollow:
    """The log-following state machine, without I/O (sans-IO): seq and cursor, idle and reconnect timers, and
    what to ask Redis or the store next. :meth:`steps` is a generator of ``(kind, argument)`` requests:

    - ``("cursor", seq)`` -> send :meth:`LogBus.cursor`; ``("read", (cursor, seq, block_ms))`` -> send the
      ``(events, cursor)`` of :meth:`LogBus.read`; a :class:`RedisUnavailable` from either is thrown in instead;
    - ``("end_of_task", None)`` -> the store's end marker or None; ``("exists", None)`` -> whether the stream
      exists; ``("last_entry", None)`` -> :meth:`LogBus.last_entry`; ``("archive", None)`` -> the archived log;
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
            if event.seq > self.seq + 1:  # trimmed from the stream's history before we read it
                batch.append(LogLine(self.seq + 1, f"[cloudai] {event.seq - self.seq - 1} earlier lines were "
                                     "trimmed from the live log; `cloudai logs` shows them once the task ends"))
            self.seq = event.seq
            batch.append(event)
        return batch

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
            batch = self.take(events)
            if batch or self.follow:
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
                archive = (yield ("archive", None)) if self.seq == self.start_seq else None
                lines = archived_lines(archive or [], self.seq)
                for start in range(0, len(lines), ARCHIVE_BATCH_LINES):
                    yield ("emit", lines[start:start + ARCHIVE_BATCH_LINES])
                yield ("emit", [end])
                return
            last_seq, last = yield ("last_entry", None)
            if last_seq <= self.seq and not isinstance(last, LogEnd):
                yield ("emit", [end])
                return


def follow_batches(bus: LogBus, task_id: str, end_of_task: Callable[[], LogEnd | None],
                   read_archive: Callable[[], list[str] | None], after_seq: int = 0, follow: bool = True,
                   on_reconnect: Callable[[Exception], None] | None = None,
                   reconnect_for_s: float = 60.0) -> Iterator[Sequence[LogEvent]]:
    """A task's log from line ``after_seq + 1`` in batches as Redis hands them over: history, then (with
    ``follow``) live lines until the end marker, which comes last. No gap, no duplicate; a dropped Redis
    connection is retried for ``reconnect_for_s`` and resumes after the last line seen. Once the stream has
    expired, the archive. ``end_of_task`` asks the store whether the task has finished (the end marker it would
    have, or None); ``read_archive`` reads its archived log. Drives :class:`LogFollow` with blocking calls."""
    io: dict[str, Callable[[Any], Any]] = {
        "cursor": lambda seq: bus.cursor(task_id, seq),
        "read": lambda a: bus.read(task_id, a[0], a[1], block_ms=a[2]),
        "end_of_task": lambda _: end_of_task(),
        "exists": lambda _: bus.exists(task_id),
        "last_entry": lambda _: bus.last_entry(task_id),
        "archive": lambda _: read_archive(),
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
