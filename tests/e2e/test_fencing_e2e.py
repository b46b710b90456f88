"""Fault injection on real processes (issue 12): `cloudai worker start` subprocesses, beat, real Redis and
Docker. Every case checks what users rely on: at most one running container of the task once the old worker is
back, the log holds exactly the final attempt's lines in order after its marker, status and exit code come from
the final attempt, and nothing is left behind (containers, leases, Redis keys without a TTL)."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import threading
import time
from typing import Any

import pytest
import redis

from cloudai import keys
from cloudai.models import TaskStatus
from cloudai.runtime import DockerRuntime
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.e2e.conftest import run, submit
from tests.e2e.test_beat_e2e import beat  # noqa: F401  (the fixture)
from tests.helpers import ROOT, WorkerProc, cli_env, cloudai, wait_ended, wait_for
from tests.services import TEST_IMAGE, free_port

S = TaskStatus
pytestmark = pytest.mark.timeout(240)


def counting(n: int, every: float = 0.3) -> str:
    return f"for i in $(seq 1 {n}); do echo line $i; sleep {every}; done"


def running_containers(task_id: str) -> list[dict[str, Any]]:
    return [c for c in DockerRuntime().find(task_id=task_id) if c.get("State") == "running"]


class OneCopy:
    """Polls Docker by label in the background: the most running containers the task ever had at once."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> OneCopy:
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            try:
                self.most = max(self.most, len(running_containers(self.task_id)))
            except Exception:  # the engine restarting (a test of that): ask again
                continue

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.most


def log_lines(settings: Settings, task_id: str) -> list[str]:
    result = run(settings, "logs", task_id)
    assert result.returncode == 0, result.stderr
    return without_final_block(result.stdout.splitlines())


def without_final_block(lines: list[str]) -> list[str]:
    """The log lines, without the status block a finished task's log ends with."""
    while lines and (lines[-1].startswith("Task ") or not lines[-1].strip()):
        lines = lines[:-1]
    return lines


def assert_final_attempt_log(lines: list[str], attempt: int, n: int) -> None:
    marker = next(i for i, ln in enumerate(lines) if ln.startswith(f"[cloudai] attempt {attempt} started"))
    assert lines[marker + 1:] == [f"line {i}" for i in range(1, n + 1)], lines


def assert_nothing_left(settings: Settings, task_id: str) -> None:
    wait_for(lambda: DockerRuntime().find(task_id=task_id) == [], 15, what=f"containers of {task_id} removed")
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    # the scheduler's per-cluster, per-worker and per-user counters live as long as the cluster; nothing else may
    forever = [k for k in client.scan_iter("cloudai:*") if client.ttl(k) == -1 and not k.startswith(keys.SCHED_PREFIX)]
    assert forever == [], f"Redis keys without a TTL: {forever}"
    assert not client.exists(keys.sched_reservation(task_id))  # its reservation went with its end ...
    held = [k for k in client.scan_iter(keys.SCHED_PREFIX + "*res:*") if client.type(k) == "set"
            and client.sismember(k, task_id)]
    assert held == [], f"{task_id} still listed in {held}"
    user = client.hgetall(keys.sched_user("tester"))  # ... and its user holds nothing any more
    assert all(float(v) == 0 for v in user.values()), user
    assert client.get(keys.execution(task_id)) is None  # the attempt registry went with the task's end


def freeze(proc: WorkerProc) -> None:
    assert proc.proc is not None
    os.killpg(proc.proc.pid, signal.SIGSTOP)


def thaw(proc: WorkerProc) -> None:
    assert proc.proc is not None
    os.killpg(proc.proc.pid, signal.SIGCONT)


def test_frozen_worker_with_retries_one_copy_and_the_true_outcome(
    settings: Settings, store: SQLiteStore, workers, beat  # type: ignore[no-untyped-def]  # noqa: F811
) -> None:
    """The issue's scenario: SIGSTOP past the heartbeat timeout, the retry runs elsewhere, SIGCONT."""
    first = workers("first-" + settings.worker_id)
    task_id = submit(settings, "--retries", "1", "--shell", TEST_IMAGE, counting(25))
    old = wait_for(lambda: (t := store.get_task(task_id)) and t.started_at and t, 60, what="start")
    second = workers("second-" + settings.worker_id)
    watch = OneCopy(task_id)
    freeze(first)
    retried = wait_for(lambda: (t := store.get_task(task_id)) and t.attempt == 2 and t.started_at and t, 60,
                       what="attempt 2 running")
    assert retried.worker_id == second.worker_id
    thaw(first)
    # within seconds of its return the old worker has stopped and removed attempt 1: from then on, one copy
    wait_for(lambda: DockerRuntime().inspect(old.container_id or "") is None, 10, what="attempt 1 removed")
    watch.start()
    done = wait_ended(store, task_id, 90)
    assert watch.stop() <= 1
    assert (done.status, done.exit_code, done.attempt, done.worker_id) == (S.COMPLETED, 0, 2, second.worker_id)
    lines = log_lines(settings, task_id)
    assert_final_attempt_log(lines, 2, 25)
    notice = next(i for i, ln in enumerate(lines) if "retrying (attempt 2 of 2)" in ln)
    assert lines[:notice] == [f"line {i}" for i in range(1, notice + 1)]  # attempt 1: in order, then fenced
    assert_nothing_left(settings, task_id)


def test_frozen_pinned_worker_without_a_second_copy_and_follow_through_the_retry(
    settings: Settings, store: SQLiteStore, workers, beat  # type: ignore[no-untyped-def]  # noqa: F811
) -> None:
    """Pinned: attempt 2 waits for the frozen worker; on resume attempt 1 is stopped before attempt 2 runs, and
    `logs -f` follows through the requeue to attempt 2's end."""
    worker = workers()
    task_id = submit(settings, "--retries", "1", "--worker", worker.worker_id, "--shell", TEST_IMAGE, counting(12))
    old = wait_for(lambda: (t := store.get_task(task_id)) and t.started_at and t, 60, what="start")
    wait_for(lambda: "line 1" in log_lines(settings, task_id), 30, 0.2, "attempt 1's first line")
    follower = subprocess.Popen(cloudai("logs", "-f", task_id), cwd=ROOT, env=cli_env(settings),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    freeze(worker)
    wait_for(lambda: store.get_task(task_id).attempt == 2, 60, what="retry")  # type: ignore[union-attr]
    thaw(worker)
    wait_for(lambda: DockerRuntime().inspect(old.container_id or "") is None, 15, what="attempt 1 removed")
    watch = OneCopy(task_id).start()
    done = wait_ended(store, task_id, 90)
    assert watch.stop() <= 1
    assert (done.status, done.exit_code, done.attempt) == (S.COMPLETED, 0, 2)
    out, err = follower.communicate(timeout=30)
    assert follower.returncode == 0, err
    assert_final_attempt_log(without_final_block(out.splitlines()), 2, 12)
    assert_final_attempt_log(log_lines(settings, task_id), 2, 12)
    earlier = run(settings, "logs", task_id, "--attempt", "1").stdout.splitlines()
    assert "retrying (attempt 2 of 2)" in earlier[-1]
    assert earlier[:-1] == [f"line {i}" for i in range(1, len(earlier))]  # in order, nothing after the notice
    assert_nothing_left(settings, task_id)


def test_frozen_worker_without_retries_is_lost_and_its_container_goes(
    settings: Settings, store: SQLiteStore, workers, beat  # type: ignore[no-untyped-def]  # noqa: F811
) -> None:
    worker = workers()
    task_id = submit(settings, "--shell", TEST_IMAGE, counting(40))
    old = wait_for(lambda: (t := store.get_task(task_id)) and t.started_at and t, 60, what="start")
    freeze(worker)
    lost = wait_ended(store, task_id, 60)
    log_before = log_lines(settings, task_id)
    thaw(worker)
    wait_for(lambda: DockerRuntime().inspect(old.container_id or "") is None, 10, what="container removed")
    assert lost.status == S.LOST
    assert log_lines(settings, task_id) == log_before  # nothing the old attempt wrote after it was lost
    assert store.get_task(task_id).status == S.LOST  # type: ignore[union-attr]
    assert_nothing_left(settings, task_id)


def test_killed_worker_with_retries_runs_exactly_once_more(
    settings: Settings, store: SQLiteStore, workers, beat  # type: ignore[no-untyped-def]  # noqa: F811
) -> None:
    first = workers("first-" + settings.worker_id)
    task_id = submit(settings, "--retries", "1", "--shell", TEST_IMAGE, counting(10))
    old = wait_for(lambda: (t := store.get_task(task_id)) and t.started_at and t, 60, what="start")
    second = workers("second-" + settings.worker_id)
    first.kill()
    wait_for(lambda: store.get_task(task_id).attempt == 2, 60, what="retry")  # type: ignore[union-attr]
    workers(first.worker_id)  # back: its old container goes before it takes new work
    wait_for(lambda: DockerRuntime().inspect(old.container_id or "") is None, 15, what="old container removed")
    watch = OneCopy(task_id).start()
    done = wait_ended(store, task_id, 90)
    assert watch.stop() <= 1
    assert (done.status, done.exit_code, done.worker_id) == (S.COMPLETED, 0, second.worker_id)
    assert_final_attempt_log(log_lines(settings, task_id), 2, 10)
    assert_nothing_left(settings, task_id)


class Proxy:
    """A TCP proxy to Redis that a test can cut and restore (a network partition of one worker)."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> Proxy:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return self

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.close()
            except OSError:
                pass

    def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                    conn.close()
                except OSError:
                    pass
            self._conns = []


def test_worker_cut_off_from_redis_fences_itself(
    settings: Settings, store: SQLiteStore, workers, beat, tmp_path  # type: ignore[no-untyped-def]  # noqa: F811
) -> None:
    port = int(settings.redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = Proxy(port).start()
    behind = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{proxy.port}/0")
    worker = WorkerProc(behind, store, settings.worker_id, tmp_path).start()
    try:
        task_id = submit(settings, "--shell", TEST_IMAGE, counting(60))
        old = wait_for(lambda: (t := store.get_task(task_id)) and t.started_at and t, 60, what="start")
        proxy.cut()
        # the order of two events, not a duration: when the task is given up (lost: a retry could start
        # another copy), the cut-off worker has already stopped its container. The status is read before the
        # container, so a container seen running here was running after the task was given up.
        when_ended: list[tuple[S, bool]] = []

        def ended() -> bool:
            status = store.get_task(task_id).status  # type: ignore[union-attr]
            if status.terminal:
                when_ended.append((status, DockerRuntime().is_running(old.container_id or "")))
            return status.terminal

        wait_for(ended, 60, 0.05, "the task to end")
        assert when_ended == [(S.LOST, False)], "lost, and its container stopped before: not so"
        proxy.start()  # the partition heals
        wait_for(lambda: DockerRuntime().inspect(old.container_id or "") is None, 20, what="container removed")
        assert store.get_task(task_id).status == S.LOST  # type: ignore[union-attr]
        assert_nothing_left(settings, task_id)
    finally:
        worker.stop()
        proxy.cut()


def _beat(settings: Settings, tmp_path: Any) -> subprocess.Popen[bytes]:
    log = open(tmp_path / "beat-private.log", "wb")  # noqa: SIM115 - the process holds it
    return subprocess.Popen(cloudai("beat", "--schedule", str(tmp_path / "beat-private-schedule")), cwd=ROOT,
                            env=cli_env(settings), stdout=log, stderr=subprocess.STDOUT)


def _archived_texts(store: SQLiteStore, task_id: str, expected: int) -> list[str]:
    """The archived lines, once ``expected`` are there (the outcome is recorded before the archive)."""
    def texts() -> list[str]:
        return [line.split(" ", 1)[1] for line in store.read_log(task_id) or []]

    try:
        wait_for(lambda: len(texts()) >= expected, 30, 0.2, "the archive")
    except AssertionError:
        pass
    return texts()


def test_redis_restart_without_persistence_mid_task(
    settings: Settings, store: SQLiteStore, docker_ready, tmp_path  # type: ignore[no-untyped-def]
) -> None:
    """Redis loses everything (no persistence) while a task runs: the attempt re-registers once the store
    vouches for it, the container runs to its end once, the archive holds every line, the outcome is true."""
    import shutil

    port = free_port()
    binary = shutil.which("redis-server") or "redis-server"
    # --dir: a redis-server loads any dump.rdb in its directory at start, even with --save ""
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(tmp_path)]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    private = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{port}/0")
    wait_for(lambda: _pings(private.redis_url), 10, what="private redis")
    worker = WorkerProc(private, store, settings.worker_id, tmp_path).start()
    beat_proc = _beat(private, tmp_path)
    try:
        task_id = submit(private, "--shell", TEST_IMAGE, counting(25, 0.2))
        wait_for(lambda: (t := store.get_task(task_id)) and t.started_at, 60, what="start")
        watch = OneCopy(task_id).start()
        time.sleep(1.0)
        server.kill()
        server.wait(10)
        time.sleep(0.5)
        server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        done = wait_ended(store, task_id, 60)
        assert watch.stop() <= 1
        assert (done.status, done.exit_code, done.attempt) == (S.COMPLETED, 0, 1)
        assert _archived_texts(store, task_id, 25) == [f"line {i}" for i in range(1, 26)]
        assert_nothing_left(private, task_id)
    finally:
        beat_proc.terminate()
        beat_proc.wait(20)
        worker.stop()
        server.kill()


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.2).ping())
    except redis.RedisError:
        return False


def test_store_unreachable_mid_task(
    settings: Settings, store: SQLiteStore, workers, beat  # type: ignore[no-untyped-def]  # noqa: F811
) -> None:
    """The store can't be written for a while (its file locked): the container runs on, lines keep flowing,
    nobody is declared dead (workers heartbeat into Redis too), and the outcome and archive land afterwards."""
    import sqlite3

    workers()
    task_id = submit(settings, "--shell", TEST_IMAGE, counting(20, 0.2))
    wait_for(lambda: (t := store.get_task(task_id)) and t.started_at, 60, what="start")
    watch = OneCopy(task_id).start()
    lock = sqlite3.connect(store.path, timeout=1, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # every writer now waits and then fails: the store is unreachable
    try:
        time.sleep(OUTAGE_S)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    done = wait_ended(store, task_id, 90)
    assert watch.stop() <= 1
    assert (done.status, done.exit_code, done.attempt) == (S.COMPLETED, 0, 1)
    assert _archived_texts(store, task_id, 20) == [f"line {i}" for i in range(1, 21)]
    assert log_lines(settings, task_id) == [f"line {i}" for i in range(1, 21)]
    assert_nothing_left(settings, task_id)


OUTAGE_S = 30.0  # as users meet it (a store failover): longer than the heartbeat timeout and the task
