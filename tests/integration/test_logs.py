"""Log following on real Redis and Docker: complete, ordered, no gap, no duplicate."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from cloudai.api import CloudAI
from cloudai.errors import RedisUnavailable
from cloudai.lines import MAX_LINE_BYTES, cut_mark
from cloudai.logevents import LogEnd, LogLine
from cloudai.logs import LogBus
from cloudai.models import TaskStatus
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.helpers import executor, message, queued_task, register, run_in_thread, wait_for

S = TaskStatus


def _collect(api: CloudAI, task_id: str, after: int = 0) -> tuple[list[LogLine], LogEnd]:
    events = list(api.follow(task_id, after))
    end = events[-1]
    assert isinstance(end, LogEnd), events[-3:]
    lines = [e for e in events[:-1] if isinstance(e, LogLine)]
    assert len(lines) == len(events) - 1
    return lines, end


@pytest.fixture
def api(settings: Settings, store: SQLiteStore) -> CloudAI:
    register(store, settings.worker_id)
    return CloudAI(settings, dispatch=lambda t: None)


@pytest.mark.usefixtures("docker_ready")
def test_follow_before_during_and_after_sees_the_same_complete_log(
    settings: Settings, store: SQLiteStore, api: CloudAI
) -> None:
    task = queued_task(store, settings.worker_id, "for i in $(seq 1 300); do echo line $i; sleep 0.005; done")
    before, before_out = run_in_thread(_collect, api, task.task_id)  # started before the container
    time.sleep(0.2)
    run, _ = run_in_thread(executor(settings, store).run, message(task))
    wait_for(lambda: store.get_task(task.task_id).started_at, what="start")  # type: ignore[union-attr]
    time.sleep(0.5)
    during, during_out = run_in_thread(_collect, api, task.task_id)  # joins mid-run
    run.join(60)
    before.join(30)
    during.join(30)
    after = _collect(api, task.task_id)  # after the end
    expected = [f"line {i}" for i in range(1, 301)]
    for lines, end in (before_out[0], during_out[0], after):
        assert [ln.text for ln in lines] == expected
        assert [ln.seq for ln in lines] == list(range(1, 301))
        assert (end.status, end.exit_code) == ("completed", 0)


@pytest.mark.usefixtures("docker_ready")
def test_hundred_thousand_lines_arrive_complete_in_order_and_batched(
    settings: Settings, store: SQLiteStore, api: CloudAI, redis_client: redis.Redis
) -> None:
    n = 100_000
    task = queued_task(store, settings.worker_id, f"seq 1 {n}")
    follower, out = run_in_thread(_collect, api, task.task_id)
    redis_client.config_resetstat()
    assert executor(settings, store).run(message(task)) == "completed"
    follower.join(120)
    lines, end = out[0]
    assert [ln.text for ln in lines] == [str(i) for i in range(1, n + 1)]
    assert end.status == "completed"
    stats = redis_client.info("commandstats")
    scripts = int(stats["cmdstat_evalsha"]["calls"])  # each append is one script call holding many entries
    assert scripts <= n / 50, f"{scripts} script calls for {n} lines: writes are not batched"
    assert "cmdstat_publish" not in stats  # the stream is the live log: nothing is PUBLISHed
    assert len(store.read_log(task.task_id) or []) == n


@pytest.mark.usefixtures("docker_ready")
def test_awkward_output(settings: Settings, store: SQLiteStore, api: CloudAI) -> None:
    command = (
        "printf '\\377\\376ok\\n'; "  # invalid UTF-8
        "printf '10%%\\r50%%\\r100%%\\n'; "  # a tqdm-like progress bar
        "head -c 1048576 /dev/zero | tr '\\0' x"  # 1 MiB without a newline
    )
    task = queued_task(store, settings.worker_id, command)
    assert executor(settings, store).run(message(task)) == "completed"
    lines, _ = _collect(api, task.task_id)
    assert lines[0].text == "\ufffd\ufffdok"
    assert lines[1].text == "100%"
    chunks = [ln.text for ln in lines[2:]]
    assert len(chunks) == 1024 * 1024 // MAX_LINE_BYTES  # cut at the line cap, each cut marked, nothing dropped
    mark = cut_mark(MAX_LINE_BYTES)
    assert all(c.endswith(mark) for c in chunks[:-1])
    assert "".join(c.removesuffix(mark) for c in chunks) == "x" * 1024 * 1024


def test_many_concurrent_followers_all_get_every_line(settings: Settings, store: SQLiteStore, api: CloudAI) -> None:
    task = queued_task(store, settings.worker_id, None, status=S.RUNNING)
    results: list[list[str]] = []
    threads = []
    for _ in range(12):
        t = threading.Thread(target=lambda: results.append([ln.text for ln in _collect(api, task.task_id)[0]]))
        t.start()
        threads.append(t)
    writer = api.bus.writer(task.task_id)
    for i in range(5000):
        writer.add(f"l{i}")
        if i % 700 == 0:
            writer.flush()
            time.sleep(0.01)
    writer.flush()
    api.bus.end(task.task_id, "completed", 0)
    for t in threads:
        t.join(60)
    assert len(results) == 12
    assert all(r == [f"l{i}" for i in range(5000)] for r in results)


def test_a_write_whose_reply_was_lost_while_redis_went_away_loses_no_line(
    settings: Settings, store: SQLiteStore, api: CloudAI
) -> None:
    """The script ran and its entry landed, but the reply was lost and Redis went away before the writer could
    ask what landed; later lines join the pending ones. The next write must neither skip nor repeat a line.
    (Faked: the lost reply and the moment Redis is away; the stream, the script and the follower are real.)"""
    task = queued_task(store, settings.worker_id, None, status=S.RUNNING)
    bus = LogBus.from_url(settings.redis_url)
    writer = bus.writer(task.task_id)
    real_append, real_last_entry = bus._append, bus.last_entry

    def lands_then_reply_lost(*args: object, **kwargs: object) -> object:
        real_append(*args, **kwargs)
        raise redis.ConnectionError("Connection closed by server.")

    def redis_away(task_id: str) -> object:
        raise RedisUnavailable(settings.redis_url, "connection refused")

    for i in range(1, 21):
        writer.add(f"line {i}")
    bus._append, bus.last_entry = lands_then_reply_lost, redis_away  # type: ignore[assignment,method-assign]
    with pytest.raises(RedisUnavailable):
        writer.flush(attempts=1)
    assert writer.backlog == 20  # unknown to the writer: they landed
    bus._append, bus.last_entry = real_append, real_last_entry  # type: ignore[method-assign]
    for i in range(21, 61):
        writer.add(f"line {i}")
    writer.flush()
    bus.end(task.task_id, "completed", 0)
    lines, _end = _collect(api, task.task_id)
    assert [e.text for e in lines] == [f"line {i}" for i in range(1, 61)]  # each once, none skipped
    assert [e.seq for e in lines] == list(range(1, 61))


def test_follow_survives_a_dropped_redis_connection(
    settings: Settings, store: SQLiteStore, api: CloudAI, redis_client: redis.Redis
) -> None:
    task = queued_task(store, settings.worker_id, None, status=S.RUNNING)
    bus = LogBus.from_url(settings.redis_url)
    writer = bus.writer(task.task_id)
    reconnects: list[Exception] = []
    seen: list[LogLine] = []
    done = threading.Event()

    def follow() -> None:
        for event in api.follow(task.task_id, on_reconnect=reconnects.append):
            if isinstance(event, LogLine):
                seen.append(event)
        done.set()

    threading.Thread(target=follow, daemon=True).start()
    for i in range(100):
        writer.add(f"a{i}")
    writer.flush()
    wait_for(lambda: len(seen) == 100, what="first half")
    killed = redis_client.client_kill_filter(_type="normal", skipme=True)
    assert killed >= 1
    for i in range(100):
        writer.add(f"b{i}")
    writer.flush()
    bus.end(task.task_id, "completed", 0)
    assert done.wait(30)
    assert [e.text for e in seen] == [f"a{i}" for i in range(100)] + [f"b{i}" for i in range(100)]
    assert [e.seq for e in seen] == list(range(1, 201))


def test_task_that_ended_without_a_marker_does_not_hang_a_follower(
    settings: Settings, store: SQLiteStore, api: CloudAI
) -> None:
    task = queued_task(store, settings.worker_id, None, status=S.RUNNING)
    writer = api.bus.writer(task.task_id)
    writer.add("only line")
    writer.flush()
    store.transition(task.task_id, S.RUNNING, S.LOST)  # e.g. its worker died and a reaper lost the race
    follower, got = run_in_thread(_collect, api, task.task_id)
    follower.join(60)  # the event: the follower returns by itself (it once waited for a marker forever)
    assert not follower.is_alive(), "the follower still waits for an end marker that will never come"
    lines, end = got[0]
    assert [ln.text for ln in lines] == ["only line"] and end.status == "lost"


def test_after_the_stream_expires_logs_come_from_the_archive(
    settings: Settings, store: SQLiteStore, api: CloudAI
) -> None:
    task = queued_task(store, settings.worker_id, None, status=S.RUNNING)
    store.transition(task.task_id, S.RUNNING, S.COMPLETED, exit_code=0)
    store.save_log(task.task_id, ["2026-01-01T00:00:00Z first", "2026-01-01T00:00:01Z second"])
    assert not api.bus.exists(task.task_id)
    lines, end = _collect(api, task.task_id)
    assert [(ln.seq, ln.text, ln.ts) for ln in lines] == [(1, "first", "2026-01-01T00:00:00Z"),
                                                          (2, "second", "2026-01-01T00:00:01Z")]
    assert (end.status, end.exit_code) == ("completed", 0)


def test_the_stream_keeps_a_byte_window_but_never_trims_what_the_archive_lacks(
    settings: Settings, redis_client: redis.Redis
) -> None:
    bus = LogBus.from_url(settings.redis_url)
    archived: list[int | None] = [0]
    writer = bus.writer("window", next_seq=1, window_bytes=256 * 1024, trim_floor=lambda: archived[0])

    def write(lines: int) -> None:
        for _ in range(lines // 100):
            writer.add_many([("y" * 1000, "")] * 100)
            writer.flush()

    def first_line() -> int:
        return int(redis_client.xrange("cloudai:logs:window", count=1)[0][0].split("-")[0])

    write(2000)  # ~2 MB, eight times the window: the archive holds nothing yet, so nothing goes
    assert first_line() == 1
    archived[0] = 1500  # the archive caught up to line 1500: the stream may go up to there, not further
    write(100)
    assert 1200 < first_line() <= 1501
    archived[0] = None  # no bound (the archive gave up; Docker's log fills it): the byte window alone
    write(100)
    assert first_line() > 1800 and int(redis_client.memory_usage("cloudai:logs:window") or 0) < 600 * 1024
