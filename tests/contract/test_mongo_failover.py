"""The Mongo store when its replica set changes primary, as far as mongomock allows (README "Many hosts": no
MongoDB server runs here, so an election itself, rollback and the driver's own retry against a real server are
not exercised; CLOUDAI_TEST_MONGO_URL runs the contract suite on a real one).

What is checked: the client keeps retryable writes and reads on and lets the URL decide how long it waits for a
new primary; a ``NotPrimaryError`` or a dropped connection surfaces as ``StoreUnavailable`` (what every caller
retries, never a wrong answer); and a compare-and-set retried after a reply that was lost is never applied twice."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mongomock
import pymongo
import pytest
from pymongo.errors import AutoReconnect, NotPrimaryError

from cloudai.errors import StoreUnavailable
from cloudai.models import Task, TaskStatus
from cloudai.store.mongo import MongoStore, client_options
from tests.contract.test_store_contract import MockedServerStore

S = TaskStatus


class Elections:
    """A collection whose next calls meet a primary change: ``before`` fails them unapplied (``NotPrimaryError``:
    the old primary stepped down), ``after`` applies them and then loses the reply (the connection dropped)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.before: dict[str, int] = {}
        self.after: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.real, name)
        if not callable(method):
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.before.get(name, 0) > 0:
                self.before[name] -= 1
                raise NotPrimaryError("not primary", {"code": 10107, "codeName": "NotWritablePrimary"})
            result = method(*args, **kwargs)
            if self.after.get(name, 0) > 0:
                self.after[name] -= 1
                raise AutoReconnect("connection closed")
            return result

        return call


@pytest.fixture
def store() -> Iterator[MongoStore]:
    s = MockedServerStore(mongomock.MongoClient(tz_aware=True)["cloudai_failover"], "mongodb://mongomock")
    s.tasks = Elections(s.tasks)  # type: ignore[assignment]
    yield s
    s.close()


def _running(store: MongoStore) -> Task:
    task = Task(task_id="t1", user_id="ana", docker_image="busybox", command="true", status=S.RUNNING,
                worker_id="w1", execution_id="0001-a")
    store.create_task(task)
    return task


def test_retryable_writes_stay_on_and_the_url_decides_how_long_to_wait_for_a_primary() -> None:
    url = "mongodb://db1:27017,db2:27017,db3:27017/cloudai?replicaSet=rs0&w=majority"
    client: pymongo.MongoClient = pymongo.MongoClient(url, connect=False, **client_options(url))
    assert client.options.retry_writes and client.options.retry_reads
    assert client.options.replica_set_name == "rs0" and client.write_concern.document == {"w": "majority"}
    assert client.options.server_selection_timeout == 5.0
    longer = url + "&serverSelectionTimeoutMS=20000"
    assert pymongo.MongoClient(longer, connect=False, **client_options(longer)).options.server_selection_timeout == 20


def test_a_step_down_is_a_store_outage_then_the_write_lands_once(store: MongoStore) -> None:
    _running(store)
    store.tasks.before["find_one_and_update"] = 1  # type: ignore[attr-defined]
    with pytest.raises(StoreUnavailable):
        store.transition("t1", S.RUNNING, S.COMPLETED, execution="0001-a", exit_code=0)
    assert store.get_task("t1").status == S.RUNNING  # type: ignore[union-attr]
    assert store.transition("t1", S.RUNNING, S.COMPLETED, execution="0001-a", exit_code=0)  # the caller's retry
    assert not store.transition("t1", S.RUNNING, S.FAILED, execution="0001-a", exit_code=1)


def test_a_write_whose_reply_was_lost_is_not_applied_twice(store: MongoStore) -> None:
    """Applied on the primary, its reply lost: the caller sees an outage and retries; the compare-and-set then
    finds the task moved on and refuses. The record holds the one outcome (the caller reads it back)."""
    _running(store)
    store.tasks.after["find_one_and_update"] = 1  # type: ignore[attr-defined]
    with pytest.raises(StoreUnavailable):
        store.transition("t1", S.RUNNING, S.FAILED, execution="0001-a", exit_code=3)
    assert not store.transition("t1", S.RUNNING, S.FAILED, execution="0001-a", exit_code=3)
    task = store.get_task("t1")
    assert task is not None and (task.status, task.exit_code, task.execution_id) == (S.FAILED, 3, "0001-a")


def test_reads_during_an_election_are_an_outage_not_a_missing_task(store: MongoStore) -> None:
    _running(store)
    store.tasks.before["find_one"] = 1  # type: ignore[attr-defined]
    with pytest.raises(StoreUnavailable):
        store.get_task("t1")
    assert store.get_task("t1") is not None
