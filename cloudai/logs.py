"""The log bus on Redis.

Per task: a Redis Stream ``cloudai:logs:<task_id>``, which is both the history and the live tail (no pub/sub
channel: a PUBLISHed batch is lost to a reader that is slow or reconnecting, and nothing needs one). Every line
has a sequence number (1, 2, ...). A stream entry holds one batch of lines: its id is ``<seq of its first
line>-0`` and its fields are ``n`` (how many), ``l`` and ``t`` (JSON lists of texts and Docker timestamps); one
entry per batch keeps Redis work per line small. The last entry is an
end marker (``end``, ``status``, ``exit_code``, ``reason``) with id ``<last seq + 1>-0``. Followers read with
``XREAD BLOCK`` from the last entry they saw, so history and live tail join with no gap and no duplicate, and a
dropped connection resumes where it stopped. History is bounded by MINID trimming to about ``maxlen`` lines and,
for a worker's writer, about ``window_bytes`` bytes, never past what the archive holds already (``trim_floor``):
a follower that falls behind the window reads the rest from the archive (:mod:`cloudai.logfollow`).

How output becomes lines: :mod:`cloudai.lines`; following a log (CLI and master): :mod:`cloudai.logfollow`.
"""

from __future__ import annotations

import json
import logging
import operator
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import redis

from cloudai import keys, metrics
from cloudai.errors import AttemptFenced, RedisUnavailable
from cloudai.logevents import LineBatch, LogEnd, LogEvent, LogLine, entry_columns
from cloudai.redisconn import connect

log = logging.getLogger(__name__)

# Fenced writes. KEYS: the stream, the task's execution key. ARGV[1]: the writer's execution id ('' for a
# controller's authoritative write). Replies: n >= 0 written, -1 another attempt is current, -2 no attempt is
# registered (Redis lost it: the writer may re-register after the store confirms), -3 the log is closed.
_CHECK = """
local function check()
  if ARGV[1] == '' then return 0 end
  local cur = redis.call('GET', KEYS[2])
  if not cur then return -2 end
  if cur ~= ARGV[1] then return -1 end
  return 0
end
local function last_seq()
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if #last == 0 then return 0, false end
  local first = tonumber(string.match(last[1][1], '^(%d+)'))
  local f = last[1][2]
  local n = 1
  for i = 1, #f, 2 do
    if f[i] == 'end' then return first, true end
    if f[i] == 'n' then n = tonumber(f[i + 1]) end
  end
  return first + n - 1, false
end
"""
# ARGV[2]: MINID for trimming; then per entry: first seq, n, l, t. Readers follow the stream itself (XREAD from
# the last id they saw): nothing is PUBLISHed, since a pub/sub message is lost to a slow or reconnecting reader
_APPEND = _CHECK + """
local ok = check()
if ok < 0 then return ok end
local last, closed = last_seq()
if closed then return -3 end
local written = 0
for i = 3, #ARGV, 4 do
  local first = tonumber(ARGV[i])
  if first > last then  -- an entry a lost reply already landed is not written twice
    redis.call('XADD', KEYS[1], 'MINID', '~', ARGV[2], ARGV[i] .. '-0', 'n', ARGV[i + 1], 'l', ARGV[i + 2],
               't', ARGV[i + 3])
    last = first + tonumber(ARGV[i + 1]) - 1
    written = written + 1
  end
end
return written
"""
# ARGV[2..4]: status, exit code, reason. The attempt ends here: its execution key goes.
_END = _CHECK + """
local ok = check()
if ok < 0 then return ok end
local last, closed = last_seq()
if closed then return -3 end
redis.call('XADD', KEYS[1], (last + 1) .. '-0', 'end', '1', 'status', ARGV[2], 'exit_code', ARGV[3],
           'reason', ARGV[4])
redis.call('DEL', KEYS[2])
return 1
"""
# Register or refresh an attempt. ARGV: execution id, TTL ms, mode ('set': make it current; 'refresh': only
# while it is current; 'retire': delete it while it is current). Replies 1 done, 0 missing, -1 another one.
_REGISTRY = """
local cur = redis.call('GET', KEYS[1])
if ARGV[3] == 'set' then
  -- execution ids start with the zero-padded attempt number: a late claim of an older attempt never
  -- replaces a newer one
  if cur and cur > ARGV[1] then return -1 end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if not cur then return 0 end
if cur ~= ARGV[1] then return -1 end
if ARGV[3] == 'retire' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""


BATCH_LINES = 500
_TEXT, _STAMP = operator.itemgetter(0), operator.itemgetter(1)  # of a line as the splitter gives it: (text, ts)
BATCH_SECONDS = 0.05


def _entry_id(seq: int) -> str:
    return f"{seq}-0"


def _seq(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


MAX_ENTRY_BYTES = 512 * 1024  # one stream entry: at most BATCH_LINES lines and about this much text
WINDOW_MARKS = 256  # a writer remembers about this many points of its byte window to trim at


class LogBus:
    """Appends, ends, reads and expires task logs on Redis."""

    def __init__(self, client: redis.Redis, maxlen: int = 1_000_000, url: str = "redis://") -> None:
        self.redis = client
        self.maxlen = maxlen
        self.url = url
        self._append = client.register_script(_APPEND)
        self._end = client.register_script(_END)
        self._registry = client.register_script(_REGISTRY)

    @classmethod
    def from_url(cls, url: str, maxlen: int = 1_000_000) -> LogBus:
        """A bus on a redis-py client of its own."""
        return cls(connect(url), maxlen, url)

    def _guard(self, exc: Exception) -> RedisUnavailable:
        return RedisUnavailable(self.url, exc)

    def last_entry(self, task_id: str) -> tuple[int, LogEvent | None]:
        """The last seq used (by a line or the end marker) and the last event (an end marker if the log is
        closed)."""
        try:
            entries: Any = self.redis.xrevrange(keys.log_stream(task_id), count=1)
        except redis.RedisError as exc:
            raise self._guard(exc) from exc
        return parse_last_entry(entries)

    def writer(self, task_id: str, next_seq: int | None = None, execution: str | None = None,
               revalidate: Callable[[], bool] | None = None, window_bytes: int = 0,
               trim_floor: Callable[[], int | None] | None = None) -> LogWriter:
        """A batching writer; with ``execution``, each write lands only while that attempt is current (else
        :class:`AttemptFenced`); ``revalidate`` asks the store whether it still is when Redis lost the key.
        ``window_bytes`` bounds the stream by bytes too; ``trim_floor`` says up to which line the archive holds
        the log (None: no bound), and the stream is never trimmed past it (see :class:`LogWriter`)."""
        if next_seq is None:
            next_seq = self.last_entry(task_id)[0] + 1
        return LogWriter(self, task_id, next_seq, execution, revalidate, window_bytes, trim_floor)

    def attempt(self, task_id: str, execution: str, ttl_s: float, mode: str = "set") -> int:
        """Register attempt ``execution`` as the task's current one (``set``), extend its TTL while it is
        current (``refresh``) or drop it (``retire``). Returns 1 done, 0 none registered, -1 another is."""
        try:
            return int(self._registry(keys=[keys.execution(task_id)],
                                      args=[execution, int(ttl_s * 1000), mode]))  # type: ignore[arg-type]
        except redis.RedisError as exc:
            raise self._guard(exc) from exc

    def current_attempt(self, task_id: str) -> str | None:
        try:
            value: Any = self.redis.get(keys.execution(task_id))
        except redis.RedisError as exc:
            raise self._guard(exc) from exc
        return value

    def end(self, task_id: str, status: str, exit_code: int | None = None, reason: str | None = None,
            execution: str | None = None, revalidate: Callable[[], bool] | None = None) -> bool:
        """Close a task's log with its final status; a log already closed stays as it is. With ``execution``
        only while that attempt is current (a stale attempt's end raises :class:`AttemptFenced`); without, it
        is a controller's verdict (lost, cancelled) that also fences out whichever attempt still writes."""
        code = "" if exit_code is None else str(exit_code)
        key = keys.log_stream(task_id)
        for _ in range(2):
            try:
                result = int(self._end(keys=[key, keys.execution(task_id)],  # type: ignore[arg-type]
                                       args=[execution or "", status, code, reason or ""]))
            except redis.RedisError as exc:
                raise self._guard(exc) from exc
            if result == -2 and execution and revalidate is not None and revalidate():
                self.attempt(task_id, execution, 3600)  # Redis lost the registry (a restart): the store vouches
                continue
            if result in (-1, -2):
                raise AttemptFenced(task_id, execution or "", "the end marker")
            return result == 1
        return False

    def expire(self, task_id: str, seconds: float) -> None:
        self.redis.expire(keys.log_stream(task_id), max(1, int(seconds)))

    def exists(self, task_id: str) -> bool:
        return bool(self.redis.exists(keys.log_stream(task_id)))

    def cursor(self, task_id: str, after_seq: int) -> str:
        """Where :meth:`read` starts so that line ``after_seq + 1`` comes first (it may sit inside a batch)."""
        top = cursor_query(after_seq)
        if top is None:
            return "0-0"
        try:
            entries: Any = self.redis.xrevrange(keys.log_stream(task_id), max=top, count=1)
        except redis.RedisError as exc:
            raise self._guard(exc) from exc
        return cursor_before(entries)

    def read(self, task_id: str, cursor: str = "0-0", after_seq: int = 0, block_ms: int | None = None,
             count: int = 50) -> tuple[Sequence[LogEvent], str]:
        """Events in entries after ``cursor`` (lines only past ``after_seq``), and the new cursor; with
        ``block_ms``, wait that long for the first entry."""
        key = keys.log_stream(task_id)
        try:
            reply: Any = self.redis.xread({key: cursor}, count=count, block=block_ms)
        except redis.RedisError as exc:
            raise self._guard(exc) from exc
        return parse_read(reply, cursor, after_seq)

    def history(self, task_id: str, upto_seq: int | None = None) -> list[LogLine]:
        """Every line the stream still holds (up to ``upto_seq``), without waiting."""
        lines: list[LogLine] = []
        cursor = "0-0"
        while True:
            events, cursor = self.read(task_id, cursor, 0, None, 200)
            if not events:
                return lines
            for event in events:
                if isinstance(event, LogEnd) or (upto_seq is not None and event.seq > upto_seq):
                    return lines
                lines.append(event)


def parse_last_entry(entries: Any) -> tuple[int, LogEvent | None]:
    """:meth:`LogBus.last_entry` from an ``XREVRANGE ... COUNT 1`` reply (shared with the master's async bus)."""
    if not entries:
        return 0, None
    entry_id, fields = entries[0]
    events = _events(entry_id, fields)
    last = events[-1] if events else None
    return (last.seq if isinstance(last, LogLine) else _seq(entry_id)), last


def cursor_before(entries: Any) -> str:
    """:meth:`LogBus.cursor` from an ``XREVRANGE key <after_seq + 1>-0 - COUNT 1`` reply."""
    return _entry_id(_seq(entries[0][0]) - 1) if entries else "0-0"


def cursor_query(after_seq: int) -> str | None:
    """The XREVRANGE max for :meth:`LogBus.cursor`; None when reading starts at the beginning."""
    return _entry_id(after_seq + 1) if after_seq > 0 else None


def parse_read(reply: Any, cursor: str, after_seq: int) -> tuple[Sequence[LogEvent], str]:
    """:meth:`LogBus.read` from an ``XREAD`` reply: the events past ``after_seq`` and the new cursor. In the
    common case (whole entries of lines, each following on, no end marker) the events are one
    :class:`LineBatch`: the entries' columns joined, no object per line."""
    batch: LineBatch | None = None
    events: list[LogEvent] | None = None  # otherwise, event by event
    for _key, entries in reply or []:  # RESP2: [[key, [(id, fields), ...]]]
        for entry_id, fields in entries:
            cursor = entry_id
            first = _seq(entry_id)
            if events is None and first > after_seq and not fields.get("end"):
                count = int(fields.get("n") or 0)
                follows = batch is None or first == batch.first + len(batch)
                if follows and count and "l" in fields and "t" in fields:  # as the writer writes them
                    batch = batch if batch is not None else LineBatch(first, [], [])
                    batch.add_entry(count, fields["l"], fields["t"])  # decoded when read, if ever
                    continue
            if events is None:
                events = list(batch) if batch is not None else []
            entry = _events(entry_id, fields)
            if first > after_seq:  # the whole entry is new (always, but for the first one read)
                events += entry
            else:
                events.extend(e for e in entry if not isinstance(e, LogLine) or e.seq > after_seq)
    if events is not None:
        return events, cursor
    return (batch if batch is not None else []), cursor


def _events(entry_id: str, fields: dict[str, str]) -> list[LogEvent]:
    if fields.get("end"):
        code = fields.get("exit_code") or ""
        return [LogEnd(fields.get("status", ""), int(code) if code else None, fields.get("reason") or None)]
    return list(LineBatch(_seq(entry_id), *entry_columns(fields.get("l", "[]"), fields.get("t", "[]"))))


class LogWriter:
    """Batches a task's lines into stream entries, several per script call (never one round-trip per
    line).

    The stream keeps a window: each write trims (``XADD MINID ~``) what lies before the last ``maxlen`` lines
    and, with ``window_bytes``, before the last ``window_bytes`` of what this writer wrote (the entries' JSON,
    what Redis holds), but never a line the archive does not hold yet: ``trim_floor()`` is the last line the
    store has (None: no bound, as when the archive gave up and Docker's log will fill it in). The trim point is
    always the start of an entry this writer wrote, so no entry holding an unarchived line goes; the writer
    remembers about :data:`WINDOW_MARKS` such starts (memory flat in the log's length)."""

    def __init__(self, bus: LogBus, task_id: str, next_seq: int, execution: str | None = None,
                 revalidate: Callable[[], bool] | None = None, window_bytes: int = 0,
                 trim_floor: Callable[[], int | None] | None = None) -> None:
        self.bus = bus
        self.task_id = task_id
        self.key = keys.log_stream(task_id)
        self.next_seq = next_seq
        self.execution = execution
        self.revalidate = revalidate
        self.window_bytes = window_bytes
        self.trim_floor = trim_floor
        self._marks: deque[tuple[int, int]] = deque()  # (an entry's first seq, bytes written before it)
        self._written = 0  # bytes of entries this writer wrote
        self._backlog_bytes = 0
        # the pending lines as two columns (a tuple per line cost the worker a sixth of its CPU on a long log);
        # the first is line ``next_seq - len(_texts)``
        self._texts: list[str] = []
        self._stamps: list[str] = []
        self._first_at = 0.0
        self._unsure = False  # a write failed: it may have landed, which the stream must say before the next

    @property
    def published(self) -> int:
        """How many lines this log holds once pending ones are flushed."""
        return self.next_seq - 1

    @property
    def backlog(self) -> int:
        """Lines added but not yet written."""
        return len(self._texts)

    @property
    def backlog_bytes(self) -> int:
        """Characters of the lines added but not yet written (what they hold in memory, about)."""
        return self._backlog_bytes

    @property
    def _first_seq(self) -> int:
        return self.next_seq - len(self._texts)

    def add(self, text: str, ts: str = "") -> None:
        """Queue a line; :meth:`flush_if_due` or :meth:`flush` writes it."""
        if not self._texts:
            self._first_at = time.monotonic()
        self._texts.append(text)
        self._stamps.append(ts)
        self._backlog_bytes += len(text)
        self.next_seq += 1
        metrics.LOG_LINES.inc()
        metrics.LOG_BYTES.inc(len(text))

    def add_many(self, lines: list[tuple[str, str]]) -> None:
        """:meth:`add` for each ``(text, ts)``."""
        if not lines:
            return
        if not self._texts:
            self._first_at = time.monotonic()
        self._texts += map(_TEXT, lines)
        self._stamps += map(_STAMP, lines)
        added = sum(map(len, self._texts[-len(lines):]))
        self._backlog_bytes += added
        self.next_seq += len(lines)
        metrics.LOG_LINES.inc(len(lines))
        metrics.LOG_BYTES.inc(added)

    def flush_if_due(self, attempts: int = 20) -> None:
        """Write when a batch is full or its first line has waited ~50 ms."""
        if len(self._texts) >= BATCH_LINES or (
            self._texts and time.monotonic() - self._first_at >= BATCH_SECONDS
        ):
            self.flush(attempts)

    def _cuts(self, limit: int) -> list[int]:
        """How many lines each entry takes when the first ``limit`` pending lines are cut into entries of at most
        BATCH_LINES lines and ~MAX_ENTRY_BYTES."""
        texts = self._texts[:limit]
        sizes: list[int] = []
        done = 0
        while done < len(texts):  # whole BATCH_LINES slices while their text is small (a size sum, no loop)
            chunk = texts[done: done + BATCH_LINES]
            if sum(map(len, chunk)) + 40 * len(chunk) > MAX_ENTRY_BYTES:
                break  # long lines: cut by size, line by line, from here (the same cuts as below would make)
            sizes.append(len(chunk))
            done += len(chunk)
        if done == len(texts):
            return sizes
        count = size = 0
        for text in texts[done:]:
            if count and (count >= BATCH_LINES or size + len(text) > MAX_ENTRY_BYTES):
                sizes.append(count)
                count = size = 0
            count += 1
            size += len(text) + 40
        return [*sizes, count]

    def _drop(self, count: int) -> None:
        self._backlog_bytes -= sum(map(len, self._texts[:count]))
        del self._texts[:count]
        del self._stamps[:count]

    def _minid(self, first_seq: int) -> int:
        """Where the write starting at line ``first_seq`` trims the stream (see the class docstring)."""
        target = max(0, first_seq - self.bus.maxlen)
        marks = self._marks
        if self.window_bytes and marks:
            # the earliest mark with at most window_bytes written from it on: what lies before it may go
            start = next((seq for seq, before in marks if self._written - before <= self.window_bytes), marks[-1][0])
            target = max(target, start)
        floor = self.trim_floor() if self.trim_floor is not None else None
        if floor is not None:
            # only whole entries whose lines are all archived: trim at an entry start this writer knows, at or
            # before the line after the floor (none known: trim nothing now)
            limit = min(target, floor + 1)
            target = max((seq for seq, _ in marks if seq <= limit), default=0)
        while len(marks) > 1 and marks[1][0] <= target:  # marks before the trim point are of no more use
            marks.popleft()
        return target

    def _remember(self, first_seq: int, size: int) -> None:
        """A write of ``size`` bytes starting with an entry at line ``first_seq``: a point to trim at later."""
        last = self._marks[-1] if self._marks else None
        if self.window_bytes:  # a mark every 1/WINDOW_MARKS of the window, in bytes or else in lines
            due = last is None or self._written - last[1] >= self.window_bytes // WINDOW_MARKS
        else:
            due = last is None or first_seq - last[0] >= max(1, self.bus.maxlen // WINDOW_MARKS)
        if due:
            self._marks.append((first_seq, self._written))
        while len(self._marks) > 4 * WINDOW_MARKS:  # never unbounded, whatever the settings
            self._marks.popleft()
        self._written += size

    def _drop_landed(self) -> None:
        last, _ = self.bus.last_entry(self.task_id)
        self._drop(max(0, min(len(self._texts), last - self._first_seq + 1)))
        self._unsure = False

    def flush(self, attempts: int = 20) -> None:
        """Write pending lines (up to 20 entries a script call, atomically fenced: see :data:`_APPEND`). On Redis
        errors retry with back-off, never writing a line twice; after ``attempts`` failures in a row raise
        :class:`RedisUnavailable` (lines stay pending). A stale attempt's lines raise :class:`AttemptFenced`."""
        failures = 0
        delay = 0.1
        while self._texts:
            try:
                if self._unsure:
                    # a failed write may have landed (its reply was lost): drop what the stream already has
                    # before cutting entries again. The script skips an entry whose first line the stream has,
                    # and a re-cut entry can hold lines it has and lines it lacks. Asked once Redis answers
                    self._drop_landed()
                    continue
                cuts = self._cuts(BATCH_LINES * 20)
                first_seq = seq = self._first_seq
                args: list[Any] = [self.execution or "", _entry_id(self._minid(first_seq))]
                at = 0
                size = 0
                for count in cuts:
                    texts, stamps = json.dumps(self._texts[at:at + count]), json.dumps(self._stamps[at:at + count])
                    args += [seq, count, texts, stamps]
                    size += len(texts) + len(stamps)
                    seq += count
                    at += count
                result = int(self.bus._append(keys=[self.key, keys.execution(self.task_id)], args=args))
                if result == -2 and self.execution and self.revalidate is not None and self.revalidate():
                    self.bus.attempt(self.task_id, self.execution, 3600)  # Redis lost it; the store vouches
                    continue
                if result in (-1, -2, -3):
                    self._drop(len(self._texts))
                    raise AttemptFenced(self.task_id, self.execution or "", "log lines")
                self._remember(first_seq, size)
                self._drop(at)
                failures = 0
            except (redis.RedisError, RedisUnavailable) as exc:
                failures += 1
                self._unsure = True
                log.warning("log flush for %s failed (%s), attempt %d", self.task_id, exc, failures)
                if failures >= attempts:
                    raise RedisUnavailable(self.bus.url, f"could not write log lines of task {self.task_id}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
