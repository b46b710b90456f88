"""Watching one container whatever the engine does: read its log on a thread that may break and be restarted,
wait for its exit through an engine that may stop answering, and stop it until it is not running (retry stop,
then kill). Used by :mod:`cloudai.executor`; knows nothing of the store."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from cloudai.lines import MAX_LINE_BYTES, split_chunks
from cloudai.logbudget import LogBudget
from cloudai.logs import LogWriter
from cloudai.runtime import DockerRuntime, EngineError

log = logging.getLogger(__name__)

DONE = object()  # the reader's last item
BATCH_WAIT = 0.05
MAX_BACKLOG = 50_000  # lines held while Redis is unreachable before the reader is made to wait
MAX_BACKLOG_BYTES = 32 * 1024 * 1024  # ...or this much of their text (the worker's memory stays bounded)
ENGINE_WAIT_S = 300.0  # how long supervision waits for a Docker engine that does not answer


def start_reader(runtime: DockerRuntime, name: str, container_id: str, skip: int, out: queue.Queue[Any],
                 chunks: Iterator[list[bytes]] | None = None,
                 complete: threading.Event | None = None, max_line: int = MAX_LINE_BYTES) -> threading.Thread:
    """The container's output split into lines, from line ``skip + 1``, put on ``out`` in lists (the lines one
    read brought) until the stream ends or breaks (then :data:`DONE`); supervision decides whether to read on.
    The output comes from ``chunks`` (the attach stream opened before the start) when given, else from
    Docker's log. ``complete`` is set when the stream ended rather than broke."""

    def read() -> None:
        try:
            source = chunks if chunks is not None else ([f] for f in runtime.stream_frames(container_id))
            seen = 0
            for lines in split_chunks(source, max_line):
                seen += len(lines)
                if seen > skip:
                    out.put(lines[max(0, len(lines) - (seen - skip)):])
            if complete is not None:
                complete.set()
        except Exception as exc:
            log.warning("log stream of %s broke: %s", container_id[:12], exc)
        finally:
            out.put(DONE)

    reader = threading.Thread(target=read, daemon=True, name=f"logs-{name}")
    reader.start()
    return reader


def wait_exit(runtime: DockerRuntime, container_id: str) -> tuple[int | None, bool]:
    """The exit code (None when the container is gone) and whether the engine failed to answer meanwhile."""
    trouble = False
    give_up = time.monotonic() + ENGINE_WAIT_S
    while True:
        try:
            return runtime.wait(container_id, timeout=30), trouble
        except EngineError as exc:
            trouble = True
            if time.monotonic() > give_up:
                log.error("container %s: the engine did not answer for %.0fs", container_id[:12], ENGINE_WAIT_S)
                return None, True
            log.warning("waiting for container %s: %s", container_id[:12], exc)
            time.sleep(1.0)


def enforce_stop(runtime: DockerRuntime, container_id: str, grace_s: float) -> None:
    """Stop (SIGTERM, grace, SIGKILL), then kill again and again until the container is not running, whatever
    the engine answers meanwhile."""
    tries = 0
    until = time.monotonic() + 3600
    while time.monotonic() < until:
        try:
            if tries == 0:
                runtime.stop(container_id, grace_s)
            else:
                runtime.kill(container_id)
        except Exception as exc:
            log.warning("stopping container %s failed (%s); retrying", container_id[:12], exc)
        tries += 1
        if runtime.state(container_id) in ("exited", "gone"):
            return
        time.sleep(min(2.0, 0.25 * tries))


def quietly(fn: Callable[..., Any], *args: Any) -> None:
    """Clean-up that must not stop the rest of the clean-up."""
    try:
        fn(*args)
    except Exception:
        log.exception("%s failed", getattr(fn, "__name__", fn))


def backlogged(writer: LogWriter) -> bool:
    """Whether the writer holds as much as it may (Redis is slow or away): the reader then waits."""
    return writer.backlog >= MAX_BACKLOG or writer.backlog_bytes >= MAX_BACKLOG_BYTES


def drain(lines: queue.Queue[Any], writer: LogWriter,
          budget: LogBudget | None = None) -> tuple[int, list[tuple[str, str]], bool]:
    """Move what the reader has into the writer (what ``budget`` keeps of it), waiting at most one batch interval
    for the first lines. Returns the seq of the first line moved, the ``(text, ts)`` of each, and whether the
    reader is done."""
    first = writer.next_seq
    moved: list[tuple[str, str]] = []
    try:
        item = lines.get(timeout=BATCH_WAIT)
    except queue.Empty:
        return first, moved, False
    while True:
        if item is DONE:
            return first, moved, True
        if budget is not None:
            item = budget.admit(item)
        moved += item
        writer.add_many(item)
        if backlogged(writer):
            return first, moved, False
        try:
            item = lines.get_nowait()
        except queue.Empty:
            return first, moved, False
