"""Logs over HTTP: the whole log as text, or Server-Sent Events that follow it live.

SSE format: one event per batch of lines, ``id:`` = the seq of the batch's last line, one ``data:`` field per
line (or, with ``?batch=json``, ``event: lines`` and one ``data:`` field of JSON ``{first, lines, ts}``); a
keep-alive comment while nothing arrives; last ``event: end`` with JSON ``{status, exit_code, reason}`` (or, when
the log can't be read any more, ``event: error`` with ``{type, message, exit_code}``). A client resumes after
``Last-Event-ID`` (or ``?after=SEQ``) with no gap and no duplicate.

Following is :class:`cloudai.logfollow.LogFollow` (the CLI's state machine) driven with asyncio: ``XREAD BLOCK``
through ``redis.asyncio``, so an idle follower holds a Redis connection and a coroutine, never a thread. Only
the rare store questions (did the task end? its archive) go to the thread pool."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Annotated, Any, Literal

import redis
import redis.asyncio as aioredis
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from cloudai import keys
from cloudai.archive import archive_batch
from cloudai.errors import CloudAIError, RedisUnavailable, ValidationError
from cloudai.logevents import LineBatch, LogEnd, LogEvent, line_columns, lines_text
from cloudai.logfollow import LogFollow
from cloudai.logs import cursor_before, cursor_query, parse_last_entry, parse_read
from cloudai.server.auth import Caller, cloud
from cloudai.server.routes import owned_task

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class AsyncLogBus:
    """The reads of :class:`cloudai.logs.LogBus` on ``redis.asyncio`` (same replies, same parsing)."""

    def __init__(self, client: aioredis.Redis, url: str) -> None:
        self.redis = client
        self.url = url

    @classmethod
    def from_url(cls, url: str) -> AsyncLogBus:
        client = aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=30, socket_connect_timeout=5,
                                         health_check_interval=15)
        return cls(client, url)

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:  # worth a retry; anything else is not
            raise RedisUnavailable(self.url, exc) from exc

    async def cursor(self, task_id: str, after_seq: int) -> str:
        top = cursor_query(after_seq)
        if top is None:
            return "0-0"
        return cursor_before(await self._call(self.redis.xrevrange, keys.log_stream(task_id), max=top, count=1))

    async def read(self, task_id: str, cursor: str, after_seq: int,
                   block_ms: int | None) -> tuple[Sequence[LogEvent], str]:
        reply = await self._call(self.redis.xread, {keys.log_stream(task_id): cursor}, count=50, block=block_ms)
        return parse_read(reply, cursor, after_seq)

    async def exists(self, task_id: str) -> bool:
        return bool(await self._call(self.redis.exists, keys.log_stream(task_id)))

    async def last_entry(self, task_id: str) -> tuple[int, LogEvent | None]:
        return parse_last_entry(await self._call(self.redis.xrevrange, keys.log_stream(task_id), count=1))

    async def close(self) -> None:
        await self.redis.aclose()


async def follow_batches(bus: AsyncLogBus, task_id: str, end_of_task: Callable[[], LogEnd | None],
                         read_archive: Callable[[int], LineBatch | None], after_seq: int = 0, follow: bool = True,
                         reconnect_for_s: float = 60.0) -> AsyncIterator[Sequence[LogEvent]]:
    """:func:`cloudai.logfollow.follow_batches` with asyncio; the blocking store calls run in the thread pool (an
    archive one chunk a call: a reader holds one chunk in memory, whatever the log's size). While
    Redis is unreachable it yields empty batches (keep-alives) and retries for ``reconnect_for_s``."""
    plan = LogFollow(after_seq, follow, reconnect_for_s).steps()
    reply: Any = None
    error: RedisUnavailable | None = None
    while True:
        try:
            kind, arg = plan.throw(error) if error is not None else plan.send(reply)
        except StopIteration:
            return
        reply, error = None, None
        try:
            if kind == "emit":
                yield arg
            elif kind == "wait":
                yield []
                await asyncio.sleep(arg[1])
            elif kind == "cursor":
                reply = await bus.cursor(task_id, arg)
            elif kind == "read":
                reply = await bus.read(task_id, *arg)
            elif kind == "exists":
                reply = await bus.exists(task_id)
            elif kind == "last_entry":
                reply = await bus.last_entry(task_id)
            elif kind == "end_of_task":
                reply = await run_in_threadpool(end_of_task)
            elif kind == "archive":
                reply = await run_in_threadpool(read_archive, arg)
        except RedisUnavailable as exc:
            error = exc


def sse_events(batch: Sequence[LogEvent], timestamps: bool = False, as_json: bool = False) -> str:
    """One batch as SSE text: a line event (if it has lines) and the end event (if it ends the log).

    The line event has one ``data:`` field per line; with ``as_json`` (``?batch=json``, what the CLI asks for) it
    is ``event: lines`` with one ``data:`` field holding ``{"first", "lines"}``, and ``"ts"`` with ``timestamps``,
    which a client decodes in one call instead of one per line (the same ``id:``, so resuming is the same)."""
    if as_json and isinstance(batch, LineBatch):  # lines only (a LineBatch holds no end marker), not indexed:
        if not batch:  # that would decode them
            return ""
        # the stream entries' own JSON arrays, joined: no decode and encode per line (two thirds of the CPU)
        return _lines_event(batch.first, batch.first + len(batch) - 1, *batch.json_columns(timestamps))
    end = batch[-1] if batch and isinstance(batch[-1], LogEnd) else None
    lines = batch[:-1] if end is not None else batch
    tail = _end_event(end) if end is not None else ""
    first, last, texts, stamps = line_columns(lines)
    if not texts:
        return tail
    if as_json:
        return _lines_event(first, last, json.dumps(texts), json.dumps(stamps) if timestamps else None) + tail
    # one data field per line (a list, not a generator, and no call per line: ~100k lines a second)
    fields = ([f"data: {ts} {text}\n" for ts, text in zip(stamps, texts, strict=True)] if timestamps
              else [f"data: {text}\n" for text in texts])
    return f"id: {last}\n" + "".join(fields) + "\n" + tail


def _lines_event(first: int, last: int, texts_json: str, stamps_json: str | None) -> str:
    """The ``?batch=json`` line event, from the columns as JSON arrays (the timestamps only if asked for: they
    are two thirds of a short line's bytes)."""
    stamps = "" if stamps_json is None else f', "ts": {stamps_json}'
    return f'event: lines\nid: {last}\ndata: {{"first": {first}, "lines": {texts_json}{stamps}}}\n\n'


def _end_event(end: LogEnd) -> str:
    data = json.dumps({"status": end.status, "exit_code": end.exit_code, "reason": end.reason})
    return f"event: end\ndata: {data}\n\n"


def _bus(request: Request) -> AsyncLogBus:
    state = request.app.state
    if state.log_bus is None:  # made on first use, inside the server's event loop
        state.log_bus = AsyncLogBus.from_url(state.settings.redis_url)
    return state.log_bus  # type: ignore[no-any-return]


MAX_SEQ = 2**53  # far beyond any log; larger ids are no stream entry Redis accepts


def _start_seq(after: int | None, last_event_id: str | None) -> int:
    if last_event_id:
        try:
            seq = max(0, int(last_event_id))
        except ValueError:
            raise ValidationError("Last-Event-ID", last_event_id, "use the id of the last event received") from None
        if seq > MAX_SEQ:
            raise ValidationError("Last-Event-ID", last_event_id, "use the id of the last event received")
        return seq
    return after or 0


@router.get("/tasks/{task_id}/logs", tags=["logs"], response_model=None,
            responses={200: {"content": {"text/plain": {}, "text/event-stream": {}}}})
async def task_logs(request: Request, task_id: str, who: Caller, follow: bool = False,
                    after: Annotated[int | None, Query(ge=0, le=MAX_SEQ, description="start after this line")] = None,
                    timestamps: bool = False,
                    batch: Annotated[Literal["lines", "json"], Query(
                        description="SSE only: one data field per line (default), or each batch as one JSON "
                                    "object {first, lines, ts} in an `event: lines`")] = "lines",
                    accept: Annotated[str, Header()] = "text/plain",
                    last_event_id: Annotated[str | None, Header()] = None) -> StreamingResponse:
    """The log as text/plain (the whole log; with ``follow``, until the task ends), or with
    ``Accept: text/event-stream`` as Server-Sent Events (see the module docstring)."""
    api = cloud(request)
    await run_in_threadpool(owned_task, api, who, task_id)
    start = _start_seq(after, last_event_id)
    bus = _bus(request)
    batches = follow_batches(bus, task_id, lambda: api.end_of(task_id),
                             lambda seq: archive_batch(api.store, task_id, seq), start, follow)
    if "text/event-stream" in accept:
        return StreamingResponse(_sse(batches, timestamps, batch == "json"), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    return StreamingResponse(_text(batches, timestamps), media_type="text/plain; charset=utf-8",
                             headers={"X-Accel-Buffering": "no"})


async def _sse(batches: AsyncIterator[Sequence[LogEvent]], timestamps: bool, as_json: bool) -> AsyncIterator[str]:
    yield "retry: 1000\n\n"
    try:
        async for batch in batches:
            yield sse_events(batch, timestamps, as_json) if batch else ": keep-alive\n\n"
    except CloudAIError as exc:  # the headers are sent: say it in the stream (Redis gone for too long)
        data = json.dumps({"type": type(exc).__name__, "message": str(exc), "exit_code": int(exc.exit_code)})
        yield f"event: error\ndata: {data}\n\n"


async def _text(batches: AsyncIterator[Sequence[LogEvent]], timestamps: bool) -> AsyncIterator[str]:
    try:
        async for batch in batches:
            text = lines_text(batch, timestamps)
            if text:
                yield text
    except Exception:  # the headers are sent: end the body (the client sees a short read), log the cause
        log.exception("log of a task could not be read to its end")
