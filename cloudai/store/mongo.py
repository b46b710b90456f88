"""MongoDB task store (production). Compare-and-set uses ``find_one_and_update`` with the status in the
filter, which MongoDB applies atomically to one document."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import pymongo
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, PyMongoError

from cloudai.errors import StoreUnavailable, TaskExists
from cloudai.models import Assignment, Quota, Task, TaskStatus, WorkerInfo, WorkerState, utcnow
from cloudai.store.base import (
    StatusFilter,
    TaskStore,
    check_transition,
    chunk_lines,
    chunk_starts,
    merge_chunks,
    plain_fields,
    status_values,
)
from cloudai.tokens import ApiToken

_SERVER_TIMEOUT_MS = 5000


class MongoStore(TaskStore):
    """Store on a MongoDB database: collections ``tasks``, ``assignments``, ``workers``, ``log_archive``."""

    def __init__(self, db: Database, url: str = "mongodb://") -> None:
        self.url = url
        self.db = db
        self.tasks: Collection = db["tasks"]
        self.assignments: Collection = db["assignments"]
        self.workers: Collection = db["workers"]
        self.logs: Collection = db["log_archive"]
        self.quotas: Collection = db["quotas"]
        self.tokens: Collection = db["api_tokens"]
        self.counters: Collection = db["counters"]
        try:
            self._ensure_indexes()
        except PyMongoError as exc:
            raise StoreUnavailable(url, exc) from exc

    @classmethod
    def connect(cls, url: str) -> MongoStore:
        client: pymongo.MongoClient = pymongo.MongoClient(
            url, tz_aware=True, serverSelectionTimeoutMS=_SERVER_TIMEOUT_MS, uuidRepresentation="standard"
        )
        try:
            db = client.get_default_database(default="cloudai")
        except pymongo.errors.ConfigurationError as exc:
            raise StoreUnavailable(url, exc) from exc
        return cls(db, url)

    def _ensure_indexes(self) -> None:
        self.tasks.create_index("task_id", unique=True)
        self.tasks.create_index([("user_id", 1), ("created_at", -1)])
        self.tasks.create_index("status")
        self.tasks.create_index([("user_id", 1), ("status", 1)])
        self.tasks.create_index("worker_id")
        self.tasks.create_index([("created_at", -1)])
        self.assignments.create_index("task_id", unique=True)
        self.assignments.create_index("worker_id")
        self.workers.create_index("worker_id", unique=True)
        self.logs.create_index([("task_id", 1), ("chunk", 1)], unique=True)
        self.quotas.create_index("user_id", unique=True)
        self.tokens.create_index("token_hash", unique=True)
        self.tokens.create_index("user_id")

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (DuplicateKeyError, TaskExists):
            raise
        except PyMongoError as exc:
            raise StoreUnavailable(self.url, exc) from exc

    # -- tasks ------------------------------------------------------------------------------------------
    def create_task(self, task: Task) -> None:
        try:
            self._call(self.tasks.insert_one, {"_id": task.task_id, **task.to_doc()})
        except DuplicateKeyError:
            raise TaskExists(f"task {task.task_id!r} already exists") from None

    def get_task(self, task_id: str) -> Task | None:
        doc = self._call(self.tasks.find_one, {"_id": task_id})
        return Task.from_doc(doc) if doc else None

    def list_tasks(
        self,
        user_id: str | None = None,
        status: StatusFilter = None,
        worker_id: str | None = None,
        limit: int | None = 50,
    ) -> list[Task]:
        query: dict[str, Any] = {}
        if user_id is not None:
            query["user_id"] = user_id
        statuses = status_values(status)
        if statuses is not None:
            query["status"] = {"$in": statuses}
        if worker_id is not None:
            query["worker_id"] = worker_id
        cursor = self.tasks.find(query).sort([("created_at", -1), ("_id", -1)])
        if limit is not None:
            cursor = cursor.limit(int(limit))
        return [Task.from_doc(d) for d in self._call(list, cursor)]

    def count_tasks(self, user_id: str, status: StatusFilter = None) -> int:
        query: dict[str, Any] = {"user_id": user_id}
        statuses = status_values(status)
        if statuses is not None:
            query["status"] = {"$in": statuses}
        return int(self._call(self.tasks.count_documents, query))

    def _validated(self, task_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        current = self._call(self.tasks.find_one, {"_id": task_id})
        if current is None:
            return fields
        Task.from_doc({**current, **fields})  # unknown names or bad values fail before the write
        return fields

    def transition(self, task_id: str, expected: StatusFilter, new: TaskStatus, *, execution: str | None = None,
                   **fields: Any) -> bool:
        values = check_transition(expected, new)
        update = {**self._validated(task_id, plain_fields(fields)), "status": new.value}
        query: dict[str, Any] = {"_id": task_id, "status": {"$in": values}}
        if execution is not None:
            query["execution_id"] = execution  # a stale attempt's write matches nothing
        doc = self._call(self.tasks.find_one_and_update, query, {"$set": update})
        return doc is not None

    def update_task(self, task_id: str, expected: StatusFilter = None, *, execution: str | None = None,
                    **fields: Any) -> bool:
        fields.pop("status", None)
        query: dict[str, Any] = {"_id": task_id}
        if execution is not None:
            query["execution_id"] = execution
        statuses = status_values(expected)
        if statuses is not None:
            query["status"] = {"$in": statuses}
        update = self._validated(task_id, plain_fields(fields))
        if not update:
            return self._call(self.tasks.count_documents, query) > 0
        return self._call(self.tasks.update_one, query, {"$set": update}).matched_count > 0

    def delete_task(self, task_id: str) -> bool:
        self._call(self.assignments.delete_many, {"task_id": task_id})
        self._call(self.logs.delete_many, {"task_id": task_id})
        return self._call(self.tasks.delete_one, {"_id": task_id}).deleted_count > 0

    # -- assignments ------------------------------------------------------------------------------------
    def create_assignment(self, task_id: str, worker_id: str) -> Assignment:
        assignment = Assignment(ass_id=uuid.uuid4().hex, task_id=task_id, worker_id=worker_id)
        self._call(
            self.assignments.replace_one, {"task_id": task_id}, dict(assignment.__dict__), upsert=True
        )
        return assignment

    @staticmethod
    def _assignment(doc: dict[str, Any]) -> Assignment:
        from cloudai.models import as_utc

        return Assignment(doc["ass_id"], doc["task_id"], doc["worker_id"], as_utc(doc["assigned_at"]))  # type: ignore[arg-type]

    def get_assignment(self, task_id: str) -> Assignment | None:
        doc = self._call(self.assignments.find_one, {"task_id": task_id})
        return self._assignment(doc) if doc else None

    def list_assignments(self, worker_id: str) -> list[Assignment]:
        cursor = self.assignments.find({"worker_id": worker_id}).sort("assigned_at", 1)
        return [self._assignment(d) for d in self._call(list, cursor)]

    def delete_assignment(self, task_id: str) -> bool:
        return self._call(self.assignments.delete_one, {"task_id": task_id}).deleted_count > 0

    # -- workers ----------------------------------------------------------------------------------------
    def _workers_changed(self) -> None:
        # after the change itself: a reader that saw the old version lists again once it sees the new one
        self._call(self.counters.update_one, {"_id": "workers"}, {"$inc": {"value": 1}}, upsert=True)

    def workers_version(self) -> object | None:
        doc = self._call(self.counters.find_one, {"_id": "workers"})
        return doc["value"] if doc else 0

    def upsert_worker(self, worker: WorkerInfo) -> None:
        self._call(self.workers.replace_one, {"worker_id": worker.worker_id}, worker.to_doc(), upsert=True)
        self._workers_changed()

    def heartbeat(self, worker_id: str, at: datetime | None = None) -> bool:
        result = self._call(
            self.workers.update_one, {"worker_id": worker_id}, {"$set": {"last_heartbeat": at or utcnow()}}
        )
        if result.matched_count:
            self._workers_changed()
        return result.matched_count > 0

    def get_worker(self, worker_id: str) -> WorkerInfo | None:
        doc = self._call(self.workers.find_one, {"worker_id": worker_id})
        return WorkerInfo.from_doc(doc) if doc else None

    def list_workers(self) -> list[WorkerInfo]:
        return [WorkerInfo.from_doc(d) for d in self._call(list, self.workers.find().sort("worker_id", 1))]

    def set_worker_state(self, worker_id: str, state: WorkerState, expected: WorkerState | None = None) -> bool:
        query: dict[str, Any] = {"worker_id": worker_id}
        if expected is not None:
            query["state"] = expected.value
        changed = self._call(self.workers.update_one, query, {"$set": {"state": state.value}}).matched_count > 0
        if changed:
            self._workers_changed()
        return changed

    def delete_worker(self, worker_id: str) -> bool:
        deleted = self._call(self.workers.delete_one, {"worker_id": worker_id}).deleted_count > 0
        if deleted:
            self._workers_changed()
        return deleted

    # -- quotas -----------------------------------------------------------------------------------------
    def set_quota(self, quota: Quota) -> None:
        self._call(self.quotas.replace_one, {"user_id": quota.user_id}, quota.to_doc(), upsert=True)

    def get_quota(self, user_id: str) -> Quota | None:
        doc = self._call(self.quotas.find_one, {"user_id": user_id})
        return Quota.from_doc(doc) if doc else None

    def list_quotas(self) -> list[Quota]:
        return [Quota.from_doc(d) for d in self._call(list, self.quotas.find().sort("user_id", 1))]

    def delete_quota(self, user_id: str) -> bool:
        return self._call(self.quotas.delete_one, {"user_id": user_id}).deleted_count > 0

    # -- log archive ------------------------------------------------------------------------------------
    def save_log(self, task_id: str, lines: list[str]) -> None:
        chunks = chunk_lines(lines)
        starts = chunk_starts(chunks) if chunks else [0]
        # write the new chunks first, then drop any stale ones besides them: a reader never sees no archive
        for first, chunk in zip(starts, chunks or [[]], strict=True):
            self._call(
                self.logs.replace_one,
                {"task_id": task_id, "chunk": first},
                {"task_id": task_id, "chunk": first, "lines": chunk},
                upsert=True,
            )
        self._call(self.logs.delete_many, {"task_id": task_id, "chunk": {"$nin": starts}})

    def append_log(self, task_id: str, first_line: int, lines: list[str], execution: str | None = None) -> bool:
        # one document can't be checked and another written atomically; the outcome's compare-and-set is the
        # strict fence, this keeps a stale attempt's archive chunks out in all but a narrow race
        if execution is not None and not self._call(self.tasks.count_documents,
                                                    {"_id": task_id, "execution_id": execution}):
            return False
        self._call(self.logs.replace_one, {"task_id": task_id, "chunk": first_line},
                   {"task_id": task_id, "chunk": first_line, "lines": list(lines)}, upsert=True)
        return True

    def read_log(self, task_id: str) -> list[str] | None:
        docs = self._call(list, self.logs.find({"task_id": task_id}).sort("chunk", 1))
        if not docs:
            return None
        return merge_chunks((d["chunk"], d["lines"]) for d in docs)

    # -- API tokens -------------------------------------------------------------------------------------
    def create_token(self, token: ApiToken) -> None:
        self._call(self.tokens.insert_one, {"_id": token.token_hash, **token.to_doc()})

    def get_token(self, token_hash: str) -> ApiToken | None:
        doc = self._call(self.tokens.find_one, {"_id": token_hash})
        return ApiToken.from_doc(doc) if doc else None

    def list_tokens(self, user_id: str | None = None) -> list[ApiToken]:
        query = {} if user_id is None else {"user_id": user_id}
        docs = self._call(list, self.tokens.find(query).sort([("created_at", 1), ("_id", 1)]))
        return [ApiToken.from_doc(d) for d in docs]

    def revoke_token(self, token_hash: str) -> bool:
        return self._call(self.tokens.update_one, {"_id": token_hash}, {"$set": {"revoked": True}}).matched_count > 0

    def touch_token(self, token_hash: str, at: datetime) -> None:
        self._call(self.tokens.update_one, {"_id": token_hash}, {"$set": {"last_used_at": at}})

    def ping(self) -> None:
        self._call(self.db.command, "ping")

    def close(self) -> None:
        self.db.client.close()
