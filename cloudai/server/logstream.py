"""Logs over HTTP: the whole log as text, or Server-Sent Events that follow it live.

SSE format: one event per batch of lines, ``id:`` = the seq of the batch's last line, one ``data:`` field per
line (or, with ``?batch=json``, ``event: lines`` and one ``data:`` field of JSON ``{first, lines, ts}``); a
keep-alive comment while nothing arrives; last ``event: end`` with JSON ``{status, exit_code, reason}`` (or, when
the log can't be read any more, ``event: error`` with ``{type, message, exit_code}``). A client resumes after
``Last-Event-ID`` (or ``?after=SEQ``) with no gap and no duplicate.

Following is :class:`cloudai.logfollow.LogFollow` (the CLI's state machine) driven with asyncio. Its waiting read
is served by the task's one shared reader (:mod:`cloudai.server.fanout`): an idle follower holds a coroutine,
never a thread nor a Redis connection. The store questions (did the task end? its archive) go to the thread
pool, the first shared by the task's followers. One user holds at most ``CLOUDAI_FOLLOWERS_PER_USER`` followers
(429 past it)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from cloudai.archive import archive_batch
from cloudai.errors import CloudAIError, RedisUnavailable, ValidationError
from cloudai.logevents import LineBatch, LogEnd, LogEvent, line_columns, lines_text
from cloudai.logfollow import LogFollow
from cloudai.server.auth import Caller, cloud
from cloudai.server.errors import public_error
from cloudai.server.fanout import Follower, LogHub
from cloudai.server.routes import owned_task

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def follow_batches(bus: Follower, task_id: str, end_of_task: Callable[[], LogEnd | None],
                         read_archive: Callable[[int], LineBatch | None], after_seq: int = 0, follow: bool = True,
                         reconnect_for_s: float = 60.0) -> AsyncIterator[Sequence[LogEvent]]:
    """:func:`cloudai.logfollow.follow_batches` with asyncio; the blocking store calls run in the thread pool (the
    end-of-task question once a second for all of a task's followers; an archive one chunk a call: a reader holds
    one chunk in memory, whatever the log's size). While Redis is unreachable it yields empty batches
    (keep-alives) and retries for ``reconnect_for_s``."""

    async def ask_store() -> LogEnd | None:
        return await run_in_threadpool(end_of_task)

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
                reply = await bus.end_of_task(ask_store)
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


def _hub(request: Request) -> LogHub:
    state = request.app.state
    if state.log_hub is None:  # made on first use, inside the server's event loop
        state.log_hub = LogHub(state.settings.redis_url, state.settings.followers_per_user)
    return state.log_hub  # type: ignore[no-any-return]


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
    hub = _hub(request)
    lease = hub.cap.acquire(who.user) if follow else None  # 429 past the user's cap, before any byte is sent
    batches = _followed(hub, task_id, lambda: api.end_of(task_id),
                        lambda seq: archive_batch(api.store, task_id, seq), start, follow,
                        request.app.state.settings.follow_reconnect_s)
    body = _sse(batches, timestamps, batch == "json") if "text/event-stream" in accept else _text(batches, timestamps)
    if lease is not None:
        body = lease.guard(body)
    if "text/event-stream" in accept:
        return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
    return StreamingResponse(body, media_type="text/plain; charset=utf-8", headers={"X-Accel-Buffering": "no"})


async def _followed(hub: LogHub, task_id: str, end_of_task: Callable[[], LogEnd | None],
                    read_archive: Callable[[int], LineBatch | None], after_seq: int, follow: bool,
                    reconnect_for_s: float) -> AsyncIterator[Sequence[LogEvent]]:
    """:func:`follow_batches` as one of the task's followers (joined on the first read, so a response that never
    starts joins nothing), or as a one-off reader without ``follow``."""
    reader = hub.join(task_id) if follow else hub.reader_of()
    try:
        async for batch in follow_batches(reader, task_id, end_of_task, read_archive, after_seq, follow,
                                          reconnect_for_s):
            yield batch
    finally:
        hub.leave(reader)


async def _sse(batches: AsyncIterator[Sequence[LogEvent]], timestamps: bool, as_json: bool) -> AsyncIterator[str]:
    yield "retry: 1000\n\n"
    try:
        async for batch in batches:
            yield sse_events(batch, timestamps, as_json) if batch else ": keep-alive\n\n"
    except CloudAIError as exc:  # the headers are sent: say it in the stream (Redis gone for too long)
        data = json.dumps(public_error(exc)["error"])
        yield f"event: error\ndata: {data}\n\n"


async def _text(batches: AsyncIterator[Sequence[LogEvent]], timestamps: bool) -> AsyncIterator[str]:
    try:
        async for batch in batches:
            text = lines_text(batch, timestamps)
            if text:
                yield text
    except Exception:  # the headers are sent: end the body (the client sees a short read), log the cause
        log.exception("log of a task could not be read to its end")
