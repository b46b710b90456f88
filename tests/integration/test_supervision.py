"""The executor's failure branches, fast, on a stub Docker engine (cloudai.stub_runtime) with real Redis and the
SQLite store: supervision that can't be defeated, fenced writes of a stale attempt, self-fencing, the order
outcome -> end marker -> archive -> removal."""

from __future__ import annotations

from typing import Any, cast

import pytest

from cloudai import keys
from cloudai.api import CloudAI
from cloudai.executor import Executor
from cloudai.fencing import Fence
from cloudai.logs import LogBus, LogEnd, LogLine
from cloudai.models import TaskStatus, new_execution_id
from cloudai.runtime import ENGINE_RESTARTED, DockerRuntime
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from cloudai.stub_runtime import StubRuntime
from tests.helpers import message, queued_task, register, run_in_thread, wait_for

S = TaskStatus


@pytest.fixture(autouse=True)
def _registered(settings: Settings, store: SQLiteStore) -> None:
    register(store, settings.worker_id, gpu_ids=["0", "1"])


def _executor(settings: Settings, store: Any, runtime: StubRuntime, fence: Fence | None = None) -> Executor:
    bus = LogBus.from_url(settings.redis_url)
    return Executor(settings, store, bus, cast(DockerRuntime, runtime), bus.redis, fence=fence)


def _log(settings: Settings, task_id: str) -> tuple[list[str], LogEnd | None]:
    events = list(CloudAI(settings).logs(task_id))
    end = events[-1] if events and isinstance(events[-1], LogEnd) else None
    return [e.text for e in events if isinstance(e, LogLine)], end


def test_a_broken_log_reader_does_not_end_supervision_cancel_still_stops(
    settings: Settings, store: SQLiteStore, redis_client: Any
) -> None:
    runtime = StubRuntime(["one"], forever=True)
    runtime.fail_streams = 10**6  # every log stream breaks at once
    task = queued_task(store, settings.worker_id, "x")
    thread, result = run_in_thread(_executor(settings, store, runtime).run, message(task))
    wait_for(lambda: store.get_task(task.task_id).started_at, 10, what="start")  # type: ignore[union-attr]
    redis_client.set(keys.cancel_flag(task.task_id), "ana")
    thread.join(20)
    assert result == ["cancelled"] and runtime.containers == {}  # stopped, recorded, then removed
    assert store.get_task(task.task_id).status == S.CANCELLED  # type: ignore[union-attr]


def test_a_broken_log_reader_does_not_end_supervision_timeout_still_stops(
    settings: Settings, store: SQLiteStore
) -> None:
    runtime = StubRuntime(["one"], forever=True)
    runtime.fail_streams = 10**6
    task = queued_task(store, settings.worker_id, "x", timeout_s=0.5)
    assert _executor(settings, store, runtime).run(message(task)) == "timeout"
    assert runtime.containers == {}


def test_a_failing_stop_is_retried_then_the_container_is_killed(settings: Settings, store: SQLiteStore,
                                                                 redis_client: Any) -> None:
    runtime = StubRuntime(["a", "b"], forever=True)
    runtime.fail_stops, runtime.ignore_term = 2, True
    task = queued_task(store, settings.worker_id, "x")
    thread, result = run_in_thread(_executor(settings, store, runtime).run, message(task))
    wait_for(lambda: store.get_task(task.task_id).started_at, 10, what="start")  # type: ignore[union-attr]
    redis_client.set(keys.cancel_flag(task.task_id), "ana")
    thread.join(20)
    got = store.get_task(task.task_id)
    assert result == ["cancelled"] and got is not None and got.exit_code == 137


def test_an_engine_restart_is_a_clear_reason(settings: Settings, store: SQLiteStore) -> None:
    runtime = StubRuntime(["before"], forever=True)
    task = queued_task(store, settings.worker_id, "x")
    thread, result = run_in_thread(_executor(settings, store, runtime).run, message(task))
    wait_for(lambda: store.get_task(task.task_id).started_at, 10, what="start")  # type: ignore[union-attr]
    runtime.engine_down = True
    import time

    time.sleep(1.5)  # supervision keeps asking an engine that does not answer
    runtime.engine_restart()
    runtime.engine_down = False
    thread.join(20)
    got = store.get_task(task.task_id)
    assert result == ["failed"] and got is not None and got.error is not None
    assert got.error.message.startswith(ENGINE_RESTARTED) and "Connection aborted" not in got.error.message


class _Recording(SQLiteStore):
    """The SQLite store, noting the order of the writes that end a task."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.calls: list[str] = []
        self.refuse_outcome = False

    def transition(self, task_id: str, expected: Any, new: TaskStatus, **fields: Any) -> bool:
        if new.terminal:
            if self.refuse_outcome:
                from cloudai.errors import StoreUnavailable

                raise StoreUnavailable(self.url, "injected outage")
            self.calls.append("outcome")
        return super().transition(task_id, expected, new, **fields)

    def append_log(self, task_id: str, first_line: int, lines: list[str], execution: str | None = None) -> bool:
        self.calls.append("archive")
        return super().append_log(task_id, first_line, lines, execution)


def test_outcome_is_recorded_before_the_archive(settings: Settings, store_path: str) -> None:
    recording = _Recording(store_path)
    runtime = StubRuntime([f"line {n}" for n in range(5)], exit_code=3)
    task = queued_task(recording, settings.worker_id, "x")
    assert _executor(settings, recording, runtime).run(message(task)) == "failed"
    assert recording.calls[0] == "outcome" and "archive" in recording.calls
    assert recording.read_log(task.task_id) and [ln.split(" ", 1)[1] for ln in recording.read_log(task.task_id)
                                                 or []] == [f"line {n}" for n in range(5)]


def test_a_container_whose_outcome_is_not_recorded_is_kept(settings: Settings, store_path: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import cloudai.executor

    monkeypatch.setattr(cloudai.executor, "STORE_RETRY_S", 1.0)
    recording = _Recording(store_path)
    recording.refuse_outcome = True
    runtime = StubRuntime(["done"], exit_code=0)
    task = queued_task(recording, settings.worker_id, "x")
    assert _executor(settings, recording, runtime).run(message(task)) == "running"
    assert len(runtime.containers) == 1 and runtime.removed == []  # exit code and log kept for a reconcile


def test_a_stale_attempt_can_neither_log_nor_report(settings: Settings, store: SQLiteStore) -> None:
    """What beat does to a frozen worker's task (lose_task with retries): afterwards the old attempt's lines,
    outcome and end marker are refused, and its container is stopped and removed."""
    runtime = StubRuntime(["old 1"], forever=True)
    task = queued_task(store, settings.worker_id, "x", retries=1)
    bus = LogBus.from_url(settings.redis_url)
    thread, result = run_in_thread(_executor(settings, store, runtime).run, message(task))
    wait_for(lambda: bus.history(task.task_id), 10, what="first line")
    newer = new_execution_id(2)
    assert store.transition(task.task_id, S.RUNNING, S.PENDING, execution=task.execution_id, attempt=2,
                            execution_id=newer, worker_id=None)
    bus.attempt(task.task_id, newer, 60)
    next(iter(runtime.containers.values())).lines.append("old 2")  # the frozen attempt prints on...
    runtime.fail_streams = 1  # ...and its reader reopens the stream, so the line is read
    thread.join(20)
    assert result == ["stale"] and runtime.containers == {}
    lines, end = _log(settings, task.task_id)
    assert lines == ["old 1"] and end is None
    got = store.get_task(task.task_id)
    assert got is not None and got.status == S.PENDING and got.execution_id == newer


def test_a_message_of_an_older_attempt_is_refused(settings: Settings, store: SQLiteStore) -> None:
    runtime = StubRuntime(["x"])
    task = queued_task(store, settings.worker_id, "x")
    old = message(task)
    store.update_task(task.task_id, execution_id=new_execution_id(2), attempt=2)
    assert _executor(settings, store, runtime).run(old) == "skipped" and runtime.containers == {}


def test_a_worker_that_cannot_heartbeat_stops_its_container_and_reports_nothing(
    settings: Settings, store: SQLiteStore
) -> None:
    runtime = StubRuntime(["one"], forever=True)
    fence = Fence(limit_s=0.5)
    task = queued_task(store, settings.worker_id, "x")
    assert _executor(settings, store, runtime, fence).run(message(task)) == "fenced"
    box = next(iter(runtime.containers.values()))
    assert box.state == "exited"  # stopped, not removed: the outcome is beat's (lost or retried)
    assert store.get_task(task.task_id).status == S.RUNNING  # type: ignore[union-attr]


def test_a_worker_back_from_a_gap_takes_new_work_only_after_clean_up(settings: Settings, store: SQLiteStore) -> None:
    runtime = StubRuntime(["hi"])
    fence = Fence(limit_s=0.2)
    import time

    time.sleep(0.3)  # silent past the limit
    task = queued_task(store, settings.worker_id, "x")
    thread, result = run_in_thread(_executor(settings, store, runtime, fence).run, message(task))
    time.sleep(0.5)
    assert result == [] and runtime.containers == {}  # waits
    assert fence.heartbeat_ok()  # the gap ends: clean-up pending
    fence.limit_s = 30.0  # heartbeats go on from here
    time.sleep(0.3)
    assert result == [] and runtime.containers == {}
    fence.cleaned()
    thread.join(10)
    assert result == ["completed"]


def test_liveness_is_judged_with_redis_time_from_either_stamp(settings: Settings, store: SQLiteStore,
                                                               redis_client: Any) -> None:
    from datetime import timedelta

    from cloudai.clock import redis_now, stamp_ms, with_redis_heartbeats

    register(store, "w-clock")
    now = redis_now(redis_client)
    store.heartbeat("w-clock", now - timedelta(seconds=100))  # the store write failed for a while
    worker = store.get_worker("w-clock")
    assert worker is not None and not worker.alive(now, settings.heartbeat_timeout_s)
    redis_client.set(keys.heartbeat("w-clock"), stamp_ms(now), px=60_000)  # but Redis has a fresh stamp
    [seen] = with_redis_heartbeats(redis_client, [worker])
    assert seen.alive(redis_now(redis_client), settings.heartbeat_timeout_s)


def test_a_redis_blip_during_re_attach_is_retried_not_fatal(settings: Settings, store: SQLiteStore,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from cloudai.errors import RedisUnavailable

    runtime = StubRuntime(["before", "after"])
    task = queued_task(store, settings.worker_id, "x", status=S.RUNNING)
    from cloudai.runtime import ContainerSpec

    cid = runtime.create(ContainerSpec(image="x", command=None, cpus=1, memory=1 << 30, task_id=task.task_id,
                                       worker_id=settings.worker_id))
    runtime.start(cid)
    ex = _executor(settings, store, runtime)
    real, failures = ex.bus.writer, [2]

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if failures[0]:
            failures[0] -= 1
            raise RedisUnavailable(settings.redis_url, "injected blip")
        return real(*args, **kwargs)

    monkeypatch.setattr(ex.bus, "writer", flaky)
    assert ex.attach(task, cid) == "completed"  # not failed: the healthy container's outcome is recorded
    lines, end = _log(settings, task.task_id)
    assert lines == ["before", "after"] and end is not None and end.status == "completed"


class _ArchiveOutage(SQLiteStore):
    """A store whose archive writes fail until the task's outcome is recorded (a store outage while it runs)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.down = True

    def transition(self, task_id: str, expected: Any, new: TaskStatus, **fields: Any) -> bool:
        if new.terminal:
            self.down = False
        return super().transition(task_id, expected, new, **fields)

    def append_log(self, task_id: str, first_line: int, lines: list[str], execution: str | None = None) -> bool:
        if self.down:
            from cloudai.errors import StoreUnavailable

            raise StoreUnavailable(self.url, "injected outage")
        return super().append_log(task_id, first_line, lines, execution)


def test_an_archive_gap_past_the_log_budget_is_filled_with_the_same_lines_the_stream_has(
    settings: Settings, store_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cloudai.archive

    monkeypatch.setattr(cloudai.archive, "MAX_BUFFER", 30)  # the outage outlasts the archiver's buffer
    outage = _ArchiveOutage(store_path)
    runtime = StubRuntime([f"line {n} " + "x" * 40 for n in range(1, 201)])
    task = queued_task(outage, settings.worker_id, "x")
    budgeted = settings.replace(log_max_bytes=2000)
    assert _executor(budgeted, outage, runtime).run(message(task)) == "completed"
    texts, end = _log(settings, task.task_id)
    assert end is not None and texts[-2].startswith("[cloudai] log budget of 1.953 KiB reached")
    assert texts[-1].startswith("[cloudai] ") and "not kept" in texts[-1]
    archived = [line.split(" ", 1)[1] for line in outage.read_log(task.task_id) or []]
    assert archived == texts  # Docker's log, read again, maps to the same lines; the summary comes from the stream
