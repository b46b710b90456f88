"""One contract for every task store backend: SQLite, Mongo on mongomock, and a real MongoDB when
CLOUDAI_TEST_MONGO_URL is set."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import mongomock
import pytest

from cloudai.errors import StoreUnavailable, TaskExists
from cloudai.models import GiB, Quota, Task, TaskError, TaskStatus, WorkerInfo, WorkerState, utcnow
from cloudai.store import TaskStore, open_store
from cloudai.store.mongo import MongoStore
from cloudai.store.sqlite import SQLiteStore

S = TaskStatus
BACKENDS = ["sqlite", "mongomock"] + (["mongodb"] if os.environ.get("CLOUDAI_TEST_MONGO_URL") else [])


class MockedServerStore(MongoStore):
    """The Mongo store on mongomock, one operation at a time: a MongoDB server applies each single-document
    write atomically, but mongomock is a library whose find-and-update can interleave across threads (a race
    test then saw two winners under load). The lock stands in for the server; the store's code is unchanged."""

    _lock = threading.Lock()

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return super()._call(fn, *args, **kwargs)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TaskStore]:
    if request.param == "sqlite":
        store: TaskStore = SQLiteStore(str(tmp_path / "contract.db"))
    elif request.param == "mongomock":
        store = MockedServerStore(mongomock.MongoClient(tz_aware=True)["cloudai_test"], "mongodb://mongomock")
    else:
        url = os.environ["CLOUDAI_TEST_MONGO_URL"].rstrip("/") + f"/cloudai_test_{uuid.uuid4().hex[:8]}"
        store = open_store(url)
    yield store
    if request.param == "mongodb":
        assert isinstance(store, MongoStore)
        store.db.client.drop_database(store.db.name)
    store.close()


def _task(n: int = 0, user: str = "ana", status: S = S.QUEUED, worker: str | None = "w1", **kw: object) -> Task:
    created = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=n)
    return Task(task_id=f"t{n}", user_id=user, docker_image="busybox", command="echo hi", status=status,
                worker_id=worker, created_at=created, **kw)  # type: ignore[arg-type]


def test_create_get_round_trip(backend: TaskStore) -> None:
    task = _task(1, env={"A": "1"}, labels={"x": "y"}, gpu_ids=["0"], timeout_s=30.0)
    backend.create_task(task)
    got = backend.get_task("t1")
    assert got == task
    assert got.created_at.tzinfo is not None
    assert backend.get_task("nope") is None


def test_duplicate_id_is_refused(backend: TaskStore) -> None:
    backend.create_task(_task(1))
    with pytest.raises(TaskExists):
        backend.create_task(_task(1))


def test_list_filters_newest_first_and_limit(backend: TaskStore) -> None:
    for n in range(6):
        backend.create_task(_task(n, user="ana" if n % 2 else "bo", worker=f"w{n % 3}",
                                  status=S.RUNNING if n < 3 else S.QUEUED))
    assert [t.task_id for t in backend.list_tasks()] == ["t5", "t4", "t3", "t2", "t1", "t0"]
    assert [t.task_id for t in backend.list_tasks(user_id="ana")] == ["t5", "t3", "t1"]
    assert [t.task_id for t in backend.list_tasks(status=S.RUNNING)] == ["t2", "t1", "t0"]
    assert [t.task_id for t in backend.list_tasks(status=[S.QUEUED], user_id="bo")] == ["t4"]
    assert [t.task_id for t in backend.list_tasks(worker_id="w0")] == ["t3", "t0"]
    assert [t.task_id for t in backend.list_tasks(limit=2)] == ["t5", "t4"]
    assert len(backend.list_tasks(limit=None)) == 6


def test_count_tasks_by_user_and_status(backend: TaskStore) -> None:
    for n in range(7):
        backend.create_task(_task(n, user="ana" if n % 2 else "bo", status=S.PENDING if n < 4 else S.QUEUED,
                                  worker=None if n < 4 else "w1"))
    assert backend.count_tasks("ana", S.PENDING) == 2 and backend.count_tasks("bo", S.PENDING) == 2
    assert backend.count_tasks("ana") == 3 and backend.count_tasks("bo", [S.PENDING, S.QUEUED]) == 4
    assert backend.count_tasks("nobody", S.PENDING) == 0


def _as_written_before_bytes(backend: TaskStore, task_id: str, memory_gb: float, storage_gb: float | None) -> None:
    """Rewrite a stored task as releases before "memory is bytes end to end" wrote it: the seed's GB floats."""
    old = {"req_memory": memory_gb, "req_storage": storage_gb}
    if isinstance(backend, MongoStore):
        backend.tasks.update_one({"_id": task_id}, {"$set": old, "$unset": {"memory_bytes": "", "storage_bytes": ""}})
        return
    assert isinstance(backend, SQLiteStore)
    with sqlite3.connect(backend.path) as db:
        doc = json.loads(db.execute("SELECT doc FROM tasks WHERE task_id=?", (task_id,)).fetchone()[0])
        del doc["memory_bytes"], doc["storage_bytes"]
        db.execute("UPDATE tasks SET doc=? WHERE task_id=?", (json.dumps({**doc, **old}), task_id))


def test_records_with_the_seeds_gb_floats_read_as_bytes(backend: TaskStore) -> None:
    backend.create_task(_task(1, memory_bytes=GiB))
    _as_written_before_bytes(backend, "t1", 0.25, 10.0)
    got = backend.get_task("t1")
    assert got is not None and (got.memory_bytes, got.storage_bytes) == (GiB // 4, 10 * GiB)
    assert [(t.memory_bytes, t.storage_bytes) for t in backend.list_tasks()] == [(GiB // 4, 10 * GiB)]
    assert backend.transition("t1", S.QUEUED, S.RUNNING, container_id="c1")  # an update keeps the value
    got = backend.get_task("t1")
    assert got is not None and got.memory_bytes == GiB // 4 and got.container_id == "c1"


def test_transition_is_compare_and_set(backend: TaskStore) -> None:
    backend.create_task(_task(1))
    now = utcnow()
    assert backend.transition("t1", S.QUEUED, S.RUNNING, started_at=now, container_id="c1")
    assert not backend.transition("t1", S.QUEUED, S.RUNNING)  # a duplicate delivery loses
    assert backend.transition("t1", [S.RUNNING], S.FAILED, exit_code=137, oom_killed=True,
                              error=TaskError("OutOfMemory", "killed"))
    got = backend.get_task("t1")
    assert got is not None
    assert (got.status, got.exit_code, got.oom_killed, got.container_id) == (S.FAILED, 137, True, "c1")
    assert got.error == TaskError("OutOfMemory", "killed")
    assert abs((got.started_at - now).total_seconds()) < 0.01  # type: ignore[operator]
    # a finished task never changes status again
    assert not backend.transition("t1", S.RUNNING, S.COMPLETED)
    assert not backend.transition("missing", S.QUEUED, S.RUNNING)


def test_transition_the_lifecycle_forbids_is_an_error(backend: TaskStore) -> None:
    backend.create_task(_task(1))
    with pytest.raises(ValueError, match="no transition"):
        backend.transition("t1", S.COMPLETED, S.RUNNING)


def test_update_fields_only_in_expected_status(backend: TaskStore) -> None:
    backend.create_task(_task(1, status=S.RUNNING))
    assert backend.update_task("t1", S.RUNNING, container_id="abc")
    assert not backend.update_task("t1", S.QUEUED, container_id="zzz")
    assert backend.update_task("t1", status="completed", pending_reason="x")  # status is ignored here
    got = backend.get_task("t1")
    assert got is not None and got.container_id == "abc" and got.status == S.RUNNING


def test_delete_task(backend: TaskStore) -> None:
    backend.create_task(_task(1))
    backend.create_assignment("t1", "w1")
    backend.save_log("t1", ["a"])
    assert backend.delete_task("t1")
    assert backend.get_task("t1") is None and backend.get_assignment("t1") is None
    assert backend.read_log("t1") is None
    assert not backend.delete_task("t1")


def test_assignments(backend: TaskStore) -> None:
    a = backend.create_assignment("t1", "w1")
    backend.create_assignment("t2", "w1")
    assert backend.get_assignment("t1") == a
    assert backend.worker_for_task("t1") == "w1"
    assert [x.task_id for x in backend.list_assignments("w1")] == ["t1", "t2"]
    backend.create_assignment("t1", "w2")  # a new attempt elsewhere replaces the old row
    assert backend.worker_for_task("t1") == "w2"
    assert [x.task_id for x in backend.list_assignments("w1")] == ["t2"]
    assert backend.delete_assignment("t2") and not backend.delete_assignment("t2")
    assert backend.worker_for_task("none") is None


def test_workers(backend: TaskStore) -> None:
    w = WorkerInfo(worker_id="w1", hostname="h", queue="cloudai.worker.w1", cpus=8, memory=32 << 30,
                   gpu_ids=["0", "1"], labels={"gpu": "a100"})
    backend.upsert_worker(w)
    assert backend.get_worker("w1") == w
    later = utcnow() + timedelta(seconds=5)
    assert backend.heartbeat("w1", later)
    assert not backend.heartbeat("ghost")
    got = backend.get_worker("w1")
    assert got is not None and abs((got.last_heartbeat - later).total_seconds()) < 0.01
    assert backend.set_worker_state("w1", WorkerState.DRAINING)
    assert not backend.set_worker_state("w1", WorkerState.ACTIVE, expected=WorkerState.OFFLINE)
    assert backend.get_worker("w1").state == WorkerState.DRAINING  # type: ignore[union-attr]
    backend.upsert_worker(WorkerInfo(worker_id="w0", hostname="h", queue="q", cpus=1, memory=1))
    assert [x.worker_id for x in backend.list_workers()] == ["w0", "w1"]
    assert backend.delete_worker("w0") and backend.get_worker("w0") is None


def test_create_assigned_records_the_task_and_its_assignment_or_neither(backend: TaskStore) -> None:
    task = _task(1, worker="w2")
    assignment = backend.create_assigned(task)
    assert backend.get_task("t1") == task
    got = backend.get_assignment("t1")
    assert got is not None and (got.task_id, got.worker_id, got.ass_id) == ("t1", "w2", assignment.ass_id)
    with pytest.raises(TaskExists):  # a known id: nothing changes, not even the assignment
        backend.create_assigned(_task(1, worker="w3"))
    assert backend.worker_for_task("t1") == "w2" and backend.get_task("t1").worker_id == "w2"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="no worker"):
        backend.create_assigned(_task(2, worker=None))
    assert backend.get_task("t2") is None and backend.get_assignment("t2") is None


def test_create_assigned_leaves_no_task_when_the_assignment_fails(backend: TaskStore,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend without a transaction over both (Mongo) writes the task, then the assignment: if that fails,
    the task is removed again. (SQLite writes both in one transaction and never calls create_assignment.)"""
    def broken(task_id: str, worker_id: str) -> None:
        raise StoreUnavailable(backend.url, "connection lost")

    monkeypatch.setattr(backend, "create_assignment", broken)
    if isinstance(backend, SQLiteStore):
        backend.create_assigned(_task(1))
        assert backend.get_assignment("t1") is not None
        return
    with pytest.raises(StoreUnavailable):
        backend.create_assigned(_task(1))
    assert backend.get_task("t1") is None and backend.get_assignment("t1") is None


def test_workers_version_changes_with_every_worker_write(backend: TaskStore) -> None:
    seen = [backend.workers_version()]

    def changed() -> bool:
        seen.append(backend.workers_version())
        return seen[-1] != seen[-2]

    backend.upsert_worker(WorkerInfo(worker_id="w1", hostname="h", queue="q", cpus=1, memory=1))
    assert changed()
    backend.create_task(_task(1))  # tasks are not workers
    assert not changed()
    assert backend.heartbeat("w1", utcnow()) and changed()
    assert backend.set_worker_state("w1", WorkerState.DRAINING) and changed()
    assert backend.delete_worker("w1") and changed()
    assert len(set(seen)) == 5 and None not in seen


def test_quotas(backend: TaskStore) -> None:
    assert backend.get_quota("ana") is None and backend.list_quotas() == []
    backend.set_quota(Quota("bob", gpus=2))
    backend.set_quota(Quota("ana", cpus=4.5, memory=8 * GiB, gpus=None, tasks=10))
    got = backend.get_quota("ana")
    assert got is not None and (got.cpus, got.memory, got.gpus, got.tasks) == (4.5, 8 * GiB, None, 10)
    backend.set_quota(Quota("cy", waiting=5))
    assert backend.get_quota("cy").waiting == 5 and got.waiting is None  # type: ignore[union-attr]
    assert backend.delete_quota("cy")
    assert [q.user_id for q in backend.list_quotas()] == ["ana", "bob"]
    backend.set_quota(Quota("bob", tasks=1))  # replaces the whole quota
    bob = backend.get_quota("bob")
    assert bob is not None and (bob.gpus, bob.tasks) == (None, 1)
    assert backend.delete_quota("bob") and not backend.delete_quota("bob")
    assert [q.user_id for q in backend.list_quotas()] == ["ana"]


def test_dependencies_and_worker_slots_round_trip(backend: TaskStore) -> None:
    backend.create_task(_task(1, status=S.PENDING, worker=None, after=["t0", "tx"]))
    assert backend.get_task("t1").after == ["t0", "tx"]  # type: ignore[union-attr]
    backend.upsert_worker(WorkerInfo(worker_id="w1", hostname="h", queue="q", cpus=1, memory=GiB, slots=3))
    assert backend.get_worker("w1").slots == 3  # type: ignore[union-attr]


def test_workload_fields_and_worker_volumes_round_trip(backend: TaskStore) -> None:
    task = _task(1, args=["python", "train.py", "--lr", "0.1"], entrypoint="", mounts=["data/x:/data:ro"],
                 shm_size=GiB, container_user="1000:1000", ipc="none", ulimits=["nofile=1024:4096"],
                 gpu_devices=["1"], gpu_ids=["1"], req_gpu=1)
    backend.create_task(task)
    assert backend.get_task("t1") == task
    info = WorkerInfo(worker_id="w1", hostname="h", queue="q", cpus=1, memory=GiB,
                      volumes={"data": "ro", "outputs": "rw,per-user"})
    backend.upsert_worker(info)
    assert backend.get_worker("w1").volumes == info.volumes  # type: ignore[union-attr]


def test_log_archive(backend: TaskStore) -> None:
    assert backend.read_log("t1") is None
    backend.save_log("t1", [])
    assert backend.read_log("t1") == []
    lines = [f"line {n} " + "x" * 300 for n in range(20000)]  # ~6 MB: several chunks
    backend.save_log("t1", lines)
    assert backend.read_log("t1") == lines
    backend.save_log("t1", ["short"])  # replaces, leaving no stale chunks
    assert backend.read_log("t1") == ["short"]


def test_transition_and_update_are_fenced_by_execution(backend: TaskStore) -> None:
    task = _task(1, status=S.RUNNING)
    backend.create_task(task)
    assert not backend.update_task("t1", S.RUNNING, execution="stale", container_id="old")
    assert not backend.transition("t1", S.RUNNING, S.COMPLETED, execution="stale", exit_code=0)
    assert backend.update_task("t1", S.RUNNING, execution=task.execution_id, container_id="new")
    assert backend.transition("t1", S.RUNNING, S.COMPLETED, execution=task.execution_id, exit_code=0)
    got = backend.get_task("t1")
    assert got is not None and got.status == S.COMPLETED and got.container_id == "new"


def test_log_archive_appended_in_chunks_while_running(backend: TaskStore) -> None:
    task = _task(1, status=S.RUNNING)
    backend.create_task(task)
    assert backend.append_log("t1", 1, ["a", "b"], execution=task.execution_id)
    assert backend.append_log("t1", 3, ["c"], execution=task.execution_id)
    assert backend.append_log("t1", 3, ["c"], execution=task.execution_id)  # a retried chunk: no duplicate
    assert not backend.append_log("t1", 4, ["stale"], execution="another-attempt")
    assert backend.read_log("t1") == ["a", "b", "c"]
    assert backend.append_log("t1", 2, ["b", "c", "d"])  # overlapping bounds: each line once, in order
    assert backend.read_log("t1") == ["a", "b", "c", "d"]
    backend.save_log("t1", ["whole"])  # a whole archive replaces every chunk
    assert backend.read_log("t1") == ["whole"]


def test_log_archive_is_compressed_counted_and_read_chunk_by_chunk(backend: TaskStore) -> None:
    from cloudai.store.base import LOG_CHUNK_BYTES, LOG_CHUNK_LINES

    task = _task(1, status=S.RUNNING)
    backend.create_task(task)
    lines = [f"2026-01-01T00:00:00Z step {n} loss 0.{n:05d} " + "x" * 80 for n in range(1, 30001)]  # ~3.5 MB
    assert backend.append_log("t1", 1, lines[:25000], execution=task.execution_id)  # one call, several chunks
    assert backend.append_log("t1", 25001, lines[25000:], execution=task.execution_id)
    chunks = list(backend.iter_log("t1"))
    assert [line for _first, part in chunks for line in part] == lines
    assert [first for first, _part in chunks] == sorted(first for first, _part in chunks) and chunks[0][0] == 1
    for first, part in chunks:  # bounded: what one reader holds at a time, whoever wrote the chunks
        assert len(part) <= LOG_CHUNK_LINES and sum(len(line) + 1 for line in part) <= LOG_CHUNK_BYTES
        assert lines[first - 1] == part[0]
    # from any line on: the chunk holding it, cut there
    assert next(backend.iter_log("t1", 12344))[1][0] == lines[12344]
    assert [ln for _f, part in backend.iter_log("t1", 29998) for ln in part] == lines[29998:]
    assert backend.read_log_chunk("t1", 30000) is None and list(backend.iter_log("t1", 30000)) == []
    info = backend.log_info("t1")
    raw = sum(len(line) + 1 for line in lines)
    assert info is not None and info.last_line == 30000 and info.chunks == len(chunks)
    assert 0 < info.stored_bytes < raw / 4  # compressed, and counted in the task's record
    assert backend.get_task("t1").log_bytes == info.stored_bytes  # type: ignore[union-attr]
    assert backend.append_log("t1", 25001, lines[25000:], execution=task.execution_id)  # a retry: counted once
    assert backend.get_task("t1").log_bytes == info.stored_bytes  # type: ignore[union-attr]
    assert backend.log_info("t2") is None and backend.read_log_chunk("t2") is None


def test_old_archives_are_listed_for_retention_and_removed(backend: TaskStore) -> None:
    backend.create_task(_task(1, status=S.RUNNING))
    backend.append_log("t1", 1, ["a", "b"])
    assert backend.old_log_archives(utcnow() - timedelta(days=1)) == []
    assert backend.old_log_archives(utcnow() + timedelta(seconds=1)) == ["t1"]
    assert backend.delete_log("t1") > 0
    got = backend.get_task("t1")
    assert got is not None and got.log_bytes == 0 and got.log_removed_at is not None
    assert backend.log_info("t1") is None and backend.read_log("t1") is None
    assert backend.old_log_archives(utcnow() + timedelta(seconds=1)) == []


def _write_old_archive(backend: TaskStore, task_id: str, chunks: dict[int, list[str]]) -> None:
    """An archive as releases before compressed chunks wrote it: JSON lists keyed by their first line."""
    if isinstance(backend, MongoStore):
        for first, lines in chunks.items():
            backend.logs.insert_one({"task_id": task_id, "chunk": first, "lines": lines})
        return
    assert isinstance(backend, SQLiteStore)
    with sqlite3.connect(backend.path) as db:
        db.executemany("INSERT INTO log_archive(task_id, chunk, text) VALUES (?,?,?)",
                       [(task_id, first, json.dumps(lines)) for first, lines in chunks.items()])


def test_archives_of_earlier_releases_are_still_read(backend: TaskStore) -> None:
    backend.create_task(_task(1, status=S.COMPLETED))
    _write_old_archive(backend, "t1", {1: ["a", "b"], 3: ["c"], 4: ["d", "e"]})
    assert backend.read_log("t1") == ["a", "b", "c", "d", "e"]
    assert list(backend.iter_log("t1", 3)) == [(4, ["d", "e"])]
    assert list(backend.iter_log("t1", 1)) == [(2, ["b"]), (3, ["c"]), (4, ["d", "e"])]
    info = backend.log_info("t1")
    assert info is not None and info.last_line == 5 and info.chunks == 3
    backend.append_log("t1", 6, ["f"])  # a task that ran across the upgrade: both kinds, read as one log
    assert backend.read_log("t1") == ["a", "b", "c", "d", "e", "f"]
    assert "t1" in backend.old_log_archives(utcnow() - timedelta(days=1))  # no date: always a candidate
    backend.delete_log("t1")
    assert backend.read_log("t1") is None


def test_ping(backend: TaskStore) -> None:
    backend.ping()


def test_unknown_scheme_and_unreachable_store_are_clear() -> None:
    from cloudai.errors import ConfigError

    with pytest.raises(ConfigError, match="mongodb://"):
        open_store("postgres://x")
    with pytest.raises(StoreUnavailable, match="CLOUDAI_STORE_URL"):
        open_store("sqlite:////proc/forbidden/dir/store.db")


# -- races: exactly one winner -----------------------------------------------------------------------------

def _race(path: str, barrier: object, results: object, n: int) -> None:
    store = SQLiteStore(path)
    barrier.wait()  # type: ignore[attr-defined]
    results.put((n, store.transition("t1", S.QUEUED, S.RUNNING, worker_id=f"w{n}")))  # type: ignore[attr-defined]


def test_sqlite_race_across_processes_has_one_winner(tmp_path: Path) -> None:
    path = str(tmp_path / "race.db")
    SQLiteStore(path).create_task(_task(1))
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(path, barrier, results, n)) for n in range(8)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    winners = [n for n, won in outcomes if won]
    assert len(winners) == 1
    assert SQLiteStore(path).get_task("t1").worker_id == f"w{winners[0]}"  # type: ignore[union-attr]


def test_race_across_threads_has_one_winner(backend: TaskStore) -> None:
    backend.create_task(_task(1))
    barrier = threading.Barrier(16)
    wins: list[int] = []

    def attempt(n: int) -> None:
        barrier.wait()
        if backend.transition("t1", S.QUEUED, S.RUNNING, worker_id=f"w{n}"):
            wins.append(n)

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert backend.get_task("t1").worker_id == f"w{wins[0]}"  # type: ignore[union-attr]


def test_unreachable_mongodb_is_a_clear_error_naming_the_url() -> None:
    with pytest.raises(StoreUnavailable) as err:
        open_store("mongodb://app:secret@127.0.0.1:9/cloudai")
    message = str(err.value)
    assert "mongodb://app:***@127.0.0.1:9/cloudai" in message and "secret" not in message
    assert "CLOUDAI_STORE_URL" in message and len(message) < 400


# -- API tokens ---------------------------------------------------------------------------------------------
def test_tokens_keep_only_the_hash_and_round_trip(backend: TaskStore) -> None:
    from cloudai import tokens

    secret, record = tokens.create(backend, "ana", admin=True, expires="90d")
    assert secret.startswith("cai_") and len(secret) >= 40 and record.prefix == secret[:12]
    got = backend.get_token(tokens.hash_token(secret))
    assert got == record and got.role == "admin" and got.expires_at is not None
    assert got.expires_at.tzinfo is not None
    # the secret itself is nowhere in what the store holds
    assert all(secret not in str(t.to_doc()) for t in backend.list_tokens())
    assert backend.get_token(tokens.hash_token(secret + "x")) is None


def test_tokens_list_revoke_touch(backend: TaskStore) -> None:
    from cloudai import tokens

    s1, r1 = tokens.create(backend, "ana")
    s2, r2 = tokens.create(backend, "bo")
    assert [t.user_id for t in backend.list_tokens()] == ["ana", "bo"]
    assert [t.prefix for t in backend.list_tokens(user_id="bo")] == [r2.prefix]
    at = utcnow()
    backend.touch_token(r1.token_hash, at)
    assert backend.get_token(r1.token_hash).last_used_at == at  # type: ignore[union-attr]
    assert backend.revoke_token(r2.token_hash)
    assert backend.get_token(r2.token_hash).revoked  # type: ignore[union-attr]
    assert not backend.get_token(r1.token_hash).revoked  # type: ignore[union-attr]
    assert not backend.revoke_token("0" * 64)


def test_token_verify_says_which_problem(backend: TaskStore) -> None:
    from cloudai import tokens
    from cloudai.errors import AuthError

    secret, record = tokens.create(backend, "ana", expires="1h")
    who = tokens.verify(backend, secret)
    assert (who.user, who.admin) == ("ana", False)
    assert backend.get_token(record.token_hash).last_used_at is not None  # type: ignore[union-attr]
    with pytest.raises(AuthError, match="no API token"):
        tokens.verify(backend, None)
    with pytest.raises(AuthError, match="not a CloudAI API token"):
        tokens.verify(backend, "hunter2")
    with pytest.raises(AuthError, match="unknown API token"):
        tokens.verify(backend, tokens.new_secret())
    with pytest.raises(AuthError, match="expired"):
        tokens.verify(backend, secret, now=utcnow() + timedelta(hours=2))
    tokens.revoke(backend, record.prefix)
    with pytest.raises(AuthError, match="revoked"):
        tokens.verify(backend, secret)


# -- browser sessions -----------------------------------------------------------------------------------------
def test_sessions_keep_only_the_hash_end_on_sign_out_expiry_and_revocation(backend: TaskStore) -> None:
    from cloudai import sessions, tokens
    from cloudai.errors import AuthError

    secret, record = tokens.create(backend, "ana", expires="2h")
    who = tokens.verify(backend, secret)
    sid, session = sessions.start(backend, who, ttl_s=3600)
    assert sid.startswith("cas_") and sid != secret
    assert sid not in json.dumps(session.to_doc(), default=str) and session.token_hash == record.token_hash
    assert sessions.resume(backend, sid).user == "ana"
    with pytest.raises(AuthError, match="sign in again"):  # not sliding: it ends an hour after sign-in
        sessions.resume(backend, sid, now=utcnow() + timedelta(minutes=61))
    longer, capped = sessions.start(backend, who, ttl_s=10 * 3600)
    assert capped.expires_at == record.expires_at  # never past its token's expiry
    assert sessions.end(backend, sid) and not sessions.end(backend, sid)
    with pytest.raises(AuthError, match="sign in again"):
        sessions.resume(backend, sid)
    assert sessions.resume(backend, longer).user == "ana"
    tokens.revoke(backend, record.prefix)  # its sessions go with it
    assert backend.get_session(capped.session_hash) is None
    with pytest.raises(AuthError):
        sessions.resume(backend, longer)
    with pytest.raises(AuthError, match="sign in again"):
        sessions.resume(backend, "cas_" + "x" * 43)


def test_expired_sessions_are_forgotten(backend: TaskStore) -> None:
    from cloudai import sessions, tokens

    who = tokens.verify(backend, tokens.create(backend, "bo")[0])
    old, old_record = sessions.start(backend, who, ttl_s=1, now=utcnow() - timedelta(hours=1))
    new, _ = sessions.start(backend, who, ttl_s=60)
    assert sessions.resume(backend, new).user == "bo"
    if isinstance(backend, SQLiteStore):  # pruned when a session starts; MongoDB's TTL index does it in time
        assert backend.get_session(old_record.session_hash) is None
    assert backend.delete_sessions(who.token_hash) >= 1
    assert backend.get_session(tokens.hash_token(new)) is None and backend.get_session(tokens.hash_token(old)) is None
