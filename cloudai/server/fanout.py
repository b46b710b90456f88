"""Live-log fan-out: one Redis reader per followed task in the master, shared by all of that task's followers.

Before, each SSE follower held its own ``XREAD BLOCK`` on a shared pool of Redis connections: 300 followers of
one user's task took every connection and another user's follower got nothing. Now a task followed by anyone has
one :class:`TaskFeed`: an asyncio task that reads the stream once (``XREAD BLOCK`` from its last entry) and keeps
what it read in a bounded ring (:data:`RING_ENTRIES` entries, about :data:`RING_BYTES`). A follower keeps only
its cursor (the last stream entry it handed on) and takes the entries after it from the ring, waking when the
reader adds some. A follower the ring has moved past (it was slow, or it started in the history) reads Redis
itself from its own cursor, without blocking, until it reaches the ring again: memory never grows with the
followers' number or slowness, and, since every read starts exactly after the follower's cursor, there is no
gap and no duplicate. The store question a follower asks when nothing arrives (did the task end?) is shared
the same way: one store call per task a second, however many follow it.

:class:`FollowerCap` bounds the followers one user holds open at once (429 past it)."""

from __future__ import annotations

import asyncio
import bisect
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import redis
import redis.asyncio as aioredis

from cloudai import keys
from cloudai.errors import RedisUnavailable, TooManyRequests
from cloudai.logevents import LogEnd, LogEvent
from cloudai.logs import cursor_before, cursor_query, parse_last_entry, parse_read
from cloudai.redisconn import async_pool

log = logging.getLogger(__name__)

RING_ENTRIES = 512  # stream entries a feed keeps (an entry is a batch of up to 500 lines) ...
RING_BYTES = 8 * 1024 * 1024  # ... and about this much text: what a follower a little behind reads from memory
READ_COUNT = 100  # entries one read of the feed's reader takes
FOLLOWER_COUNT = 50  # entries one follower's read hands on (as a follower's own XREAD did)
BLOCK_MS = 1000
IDLE_STOP_S = 5.0  # a feed nobody follows stops after this (a reconnecting follower finds it still there)
END_CHECK_S = 1.0  # a task's "did it end?" answer is shared by its followers for this long
EntryId = tuple[int, int]


def entry_key(entry_id: str) -> EntryId:
    """A stream entry id as a comparable pair (``"12-0"`` -> ``(12, 0)``)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _entry_size(fields: dict[str, str]) -> int:
    return sum(len(v) for v in fields.values()) + 64


class AsyncLogBus:
    """The reads of :class:`cloudai.logs.LogBus` on ``redis.asyncio`` (same replies, same parsing): the
    followers' short, non-blocking calls."""

    def __init__(self, client: aioredis.Redis, url: str) -> None:
        self.redis = client
        self.url = url

    async def _call(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:  # worth a retry; anything else is not
            raise RedisUnavailable(self.url, exc) from exc

    async def cursor(self, task_id: str, after_seq: int) -> str:
        top = cursor_query(after_seq)
        if top is None:
            return "0-0"
        return cursor_before(await self._call(self.redis.xrevrange, keys.log_stream(task_id), max=top, count=1))

    async def read(self, task_id: str, cursor: str, after_seq: int) -> tuple[Sequence[LogEvent], str]:
        """The entries after ``cursor``, without waiting."""
        reply = await self._call(self.redis.xread, {keys.log_stream(task_id): cursor}, count=FOLLOWER_COUNT)
        return parse_read(reply, cursor, after_seq)

    async def exists(self, task_id: str) -> bool:
        return bool(await self._call(self.redis.exists, keys.log_stream(task_id)))

    async def last_entry(self, task_id: str) -> tuple[int, LogEvent | None]:
        return parse_last_entry(await self._call(self.redis.xrevrange, keys.log_stream(task_id), count=1))


class TaskFeed:
    """One task's shared reader: the entries after ``base`` that it read, newest last, in a bounded ring."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.key = keys.log_stream(task_id)
        self.base: EntryId | None = None  # the ring holds every entry after this id (None: not read yet)
        self.ids: list[EntryId] = []
        self.entries: list[tuple[str, dict[str, str]]] = []
        self.size = 0
        self.changed = asyncio.Event()  # replaced (after being set) each time entries arrive
        self.followers = 0
        self.idle_since = time.monotonic()
        self.error: RedisUnavailable | None = None
        self.runner: asyncio.Task[None] | None = None
        self.end_check: asyncio.Future[LogEnd | None] | None = None
        self.end_checked_at = 0.0

    def after(self, cursor: str) -> list[tuple[str, dict[str, str]]] | None:
        """Up to :data:`FOLLOWER_COUNT` entries after ``cursor``; ``[]`` when the cursor is at the tail; None when
        the ring does not reach back to it (the follower reads Redis itself)."""
        if self.base is None:
            return None
        at = entry_key(cursor)
        if at < self.base:
            return None
        start = bisect.bisect_right(self.ids, at)
        return self.entries[start:start + FOLLOWER_COUNT]

    def add(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        for entry_id, fields in entries:
            self.ids.append(entry_key(entry_id))
            self.entries.append((entry_id, fields))
            self.size += _entry_size(fields)
        drop = 0
        while len(self.entries) - drop > RING_ENTRIES or (self.size > RING_BYTES and len(self.entries) - drop > 1):
            self.size -= _entry_size(self.entries[drop][1])
            drop += 1
        if drop:
            self.base = self.ids[drop - 1]
            del self.ids[:drop], self.entries[:drop]
        self.wake()

    def wake(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


class LogHub:
    """The master's feeds, one per followed task, and the clients they read with."""

    def __init__(self, url: str, followers_per_user: int) -> None:
        common: dict[str, Any] = {"decode_responses": True, "socket_timeout": 30, "socket_connect_timeout": 5,
                                  "health_check_interval": 15}
        # two pools: the readers' blocking reads (one per followed task) never starve the followers' short ones
        # (redisconn: one Redis, or the primary of a Sentinel deployment, found again after a failover)
        self._reader_pool = async_pool(url, max_connections=512, timeout=5, **common)
        self._query_pool = async_pool(url, max_connections=64, timeout=20, **common)
        self.reader = aioredis.Redis(connection_pool=self._reader_pool)
        # a burst of followers waits for one of its connections instead of failing with "Too many connections"
        self.bus = AsyncLogBus(aioredis.Redis(connection_pool=self._query_pool), url)
        self.url = url
        self.feeds: dict[str, TaskFeed] = {}
        self.cap = FollowerCap(followers_per_user)

    async def close(self) -> None:
        for feed in list(self.feeds.values()):
            if feed.runner is not None:
                feed.runner.cancel()
        await self.reader.aclose()
        await self.bus.redis.aclose()
        await self._reader_pool.disconnect()
        await self._query_pool.disconnect()

    def reader_of(self) -> Follower:
        """A reader of a log that does not wait for new lines (no feed needed)."""
        return Follower(self, None)

    def join(self, task_id: str) -> Follower:
        """A follower of ``task_id``, its feed started if nobody followed the task."""
        feed = self.feeds.get(task_id)
        if feed is None or feed.runner is None or feed.runner.done():
            feed = TaskFeed(task_id)
            self.feeds[task_id] = feed
            feed.runner = asyncio.create_task(self._run(feed), name=f"log feed {task_id}")
        feed.followers += 1
        return Follower(self, feed)

    def leave(self, follower: Follower) -> None:
        feed = follower.feed
        if feed is None:
            return
        feed.followers -= 1
        if feed.followers == 0:
            feed.idle_since = time.monotonic()

    async def _run(self, feed: TaskFeed) -> None:
        """Read the task's stream once for all its followers, until nobody followed it for IDLE_STOP_S."""
        cursor = ""
        try:
            while feed.followers > 0 or time.monotonic() - feed.idle_since < IDLE_STOP_S:
                try:
                    if not cursor:  # start at the stream's end: followers read the history themselves
                        last: Any = await self.reader.xrevrange(feed.key, count=1)
                        cursor = str(last[0][0]) if last else "0-0"
                        feed.base = entry_key(cursor)
                    reply: Any = await self.reader.xread({feed.key: cursor}, count=READ_COUNT, block=BLOCK_MS)
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    if feed.error is None:
                        log.warning("log feed of %s: Redis does not answer (%s); followers read it themselves",
                                    feed.task_id, exc)
                    feed.error = RedisUnavailable(self.url, exc)
                    feed.wake()  # waiting followers ask Redis themselves, and so learn it is away
                    await asyncio.sleep(1.0)
                    continue
                feed.error = None
                entries: list[tuple[str, dict[str, str]]] = [entry for _key, got in reply or [] for entry in got]
                if entries:
                    cursor = entries[-1][0]
                    feed.add(entries)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not leave followers waiting on a dead feed: they read Redis themselves
            log.exception("log feed of %s stopped", feed.task_id)
            feed.error = RedisUnavailable(self.url, "the log feed stopped")
            feed.wake()
        finally:
            if self.feeds.get(feed.task_id) is feed:
                del self.feeds[feed.task_id]


class Follower:
    """One follower of one task: the reads :func:`cloudai.server.logstream.follow_batches` makes, the blocking
    one served from the task's feed (without a feed, none may block)."""

    def __init__(self, hub: LogHub, feed: TaskFeed | None) -> None:
        self.hub = hub
        self.feed = feed

    async def cursor(self, task_id: str, after_seq: int) -> str:
        return await self.hub.bus.cursor(task_id, after_seq)

    async def exists(self, task_id: str) -> bool:
        return await self.hub.bus.exists(task_id)

    async def last_entry(self, task_id: str) -> tuple[int, LogEvent | None]:
        return await self.hub.bus.last_entry(task_id)

    async def read(self, task_id: str, cursor: str, after_seq: int,
                   block_ms: int | None) -> tuple[Sequence[LogEvent], str]:
        """The events after ``cursor`` (lines past ``after_seq``) and the new cursor, as ``XREAD`` would give them;
        with ``block_ms``, waiting up to that long for the feed to bring some."""
        feed = self.feed
        if feed is None or not block_ms:
            return await self.hub.bus.read(task_id, cursor, after_seq)
        deadline = time.monotonic() + block_ms / 1000
        while True:
            entries = feed.after(cursor)
            if entries:
                return parse_read([[feed.key, entries]], cursor, after_seq)
            if entries is None or feed.error is not None:
                # behind the ring, before the reader started, or the reader can't reach Redis: ask Redis now
                events, moved = await self.hub.bus.read(task_id, cursor, after_seq)
                if moved != cursor:
                    return events, moved
            changed = feed.changed
            left = deadline - time.monotonic()
            if left <= 0:
                return [], cursor
            try:
                await asyncio.wait_for(changed.wait(), left)
            except TimeoutError:
                return [], cursor

    async def end_of_task(self, ask: Callable[[], Awaitable[LogEnd | None]]) -> LogEnd | None:
        """``ask()`` (the store: did the task end?), shared with the task's other followers for a second."""
        feed = self.feed
        if feed is None:
            return await ask()
        now = time.monotonic()
        if feed.end_check is None or now - feed.end_checked_at > END_CHECK_S:
            feed.end_check = asyncio.ensure_future(ask())
            feed.end_checked_at = now
        return await asyncio.shield(feed.end_check)


class FollowerCap:
    """The live-log followers each user holds open, at most ``limit`` each (0: no limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held: dict[str, int] = {}
        self._lock = threading.Lock()  # a lease may be collected (and released) on another thread

    def acquire(self, user: str) -> Lease:
        """A lease for one more follower of ``user``; :class:`TooManyRequests` past the limit."""
        with self._lock:
            held = self.held.get(user, 0)
            if self.limit and held >= self.limit:
                raise TooManyRequests(
                    f"you are following {held} live logs at once, the most this server allows "
                    f"(CLOUDAI_FOLLOWERS_PER_USER={self.limit}); close one (a browser tab, a `cloudai logs -f`) "
                    "and try again", 5)
            self.held[user] = held + 1
        return Lease(self, user)

    def release(self, user: str) -> None:
        with self._lock:
            held = self.held.get(user, 0) - 1
            if held > 0:
                self.held[user] = held
            else:
                self.held.pop(user, None)


class Lease:
    """One follower's place under its user's cap, given back exactly once: when its stream ends, fails, is
    closed, or (a response never started) is garbage."""

    def __init__(self, cap: FollowerCap, user: str) -> None:
        self.cap = cap
        self.user = user
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.cap.release(self.user)

    def __del__(self) -> None:
        self.release()

    async def guard(self, body: AsyncIterator[str]) -> AsyncIterator[str]:
        """``body``, releasing this lease when it ends however it ends."""
        try:
            async for chunk in body:
                yield chunk
        finally:
            self.release()
