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
from cloudai.sessions import BrowserSession
from cloudai.store.base import (
    ArchiveInfo,
    StatusFilter,
    TaskStore,
    check_transition,
    chunk_lines,
    chunk_starts,
    pack_lines,
    pick_chunk,
    plain_fields,
    status_values,
    unpack_lines,
)
from cloudai.tokens import ApiToken

_SERVER_TIMEOUT_MS = 5000


def client_options(url: str) -> dict[str, Any]:
    """``MongoClient``'s keyword options for ``url``. Retryable writes and reads stay on (pymongo's default): a
    single-document write (every compare-and-set is one ``find_one_and_update``) that meets a primary change
    (``NotPrimaryError``, a dropped connection) is retried once by the driver on the new primary, and the server
    applies it at most once. The driver waits ``serverSelectionTimeoutMS`` for that primary: 5 s here unless the
    URL says otherwise (a replica set whose elections take longer names a longer one, README "Many hosts")."""
    options: dict[str, Any] = {"tz_aware": True, "uuidRepresentation": "standard"}
    if "serverselectiontimeoutms=" not in url.partition("?")[2].lower():  # keyword options override the URL's
        options["serverSelectionTimeoutMS"] = _SERVER_TIMEOUT_MS
    return options


class MongoStore(TaskStore):
    """Store on a MongoDB database: collections ``tasks``, ``assignments``, ``workers``, ``log_chunks`` (the
    compressed log archive; ``log_archive`` holds archives of earlier releases, read as they are)."""

    def __init__(self, db: Database, url: str = "mongodb://") -> None:
        self.url = url
        self.db = db
        self.tasks: Collection = db["tasks"]
        self.assignments: Collection = db["assignments"]
        self.workers: Collection = db["workers"]
        self.logs: Collection = db["log_archive"]
        self.chunks: Collection = db["log_chunks"]
        self.quotas: Collection = db["quotas"]
        self.tokens: Collection = db["api_tokens"]
        self.sessions: Collection = db["browser_sessions"]
        self.counters: Collection = db["counters"]
        try:
            self._ensure_indexes()
        except PyMongoError as exc:
            raise StoreUnavailable(url, exc) from exc

    @classmethod
    def connect(cls, url: str) -> MongoStore:
        client: pymongo.MongoClient = pymongo.MongoClient(url, **client_options(url))
        try:
            db = client.get_default_database(default="cloudai")
        except pymongo.errors.ConfigurationError as exc:
            raise StoreUnavailable(url, exc) from exc
        return cls(db, url)

    def _ensure_indexes(self) -> None:
        self.tasks.create_index("task_id", unique=True)
        self.tasks.create_index([("user_id", 1), ("created_at", -1), ("task_id", -1)])
        self.tasks.create_index("status")
        self.tasks.create_index([("user_id", 1), ("status", 1)])
        self.tasks.create_index("worker_id")
        self.tasks.create_index([("created_at", -1), ("task_id", -1)])
        self.tasks.create_index([("status", 1), ("created_at", -1), ("task_id", -1)])
        self.assignments.create_index("task_id", unique=True)
        self.assignments.create_index("worker_id")
        self.workers.create_index("worker_id", unique=True)
        self.logs.create_index([("task_id", 1), ("chunk", 1)], unique=True)
        self.chunks.create_index([("task_id", 1), ("first", 1)], unique=True)
        self.chunks.create_index([("task_id", 1), ("last", 1)])
        self.chunks.create_index("written_at")
        self.quotas.create_index("user_id", unique=True)
        self.tokens.create_index("token_hash", unique=True)
        self.tokens.create_index("user_id")
        self.sessions.create_index("token_hash")
        self.sessions.create_index("expires_at", expireAfterSeconds=0)  # MongoDB removes expired sessions

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
        before: tuple[datetime, str] | None = None,
    ) -> list[Task]:
        query: dict[str, Any] = {}
        if before is not None:  # keyset on the index (created_at, task_id)
            query["$or"] = [{"created_at": {"$lt": before[0]}},
                            {"created_at": before[0], "task_id": {"$lt": before[1]}}]
        if user_id is not None:
            query["user_id"] = user_id
        statuses = status_values(status)
        if statuses is not None:
            query["status"] = {"$in": statuses}
        if worker_id is not None:
            query["worker_id"] = worker_id
        cursor = self.tasks.find(query).sort([("created_at", -1), ("task_id", -1)])
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
        self._call(self.chunks.delete_many, {"task_id": task_id})
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
        docs = _chunk_docs(task_id, 1, lines) if lines else [_chunk_doc(task_id, 0, [])]
        # write the new chunks first, then drop any others: a reader never sees no archive
        for doc in docs:
            self._write_chunk(doc)
        stale = {"task_id": task_id, "first": {"$nin": [d["first"] for d in docs]}}
        freed = sum(d["bytes"] for d in self._call(list, self.chunks.find(stale, {"bytes": 1})))
        self._call(self.chunks.delete_many, stale)
        freed += self._delete_old(task_id)
        self._count(task_id, -freed)

    def append_log(self, task_id: str, first_line: int, lines: list[str], execution: str | None = None) -> bool:
        # one document can't be checked and another written atomically; the outcome's compare-and-set is the
        # strict fence, this keeps a stale attempt's archive chunks out in all but a narrow race
        if execution is not None and not self._call(self.tasks.count_documents,
                                                    {"_id": task_id, "execution_id": execution}):
            return False
        for doc in _chunk_docs(task_id, first_line, lines):
            self._write_chunk(doc)
        return True

    def _write_chunk(self, doc: dict[str, Any]) -> None:
        """Write (or replace) one chunk and count the bytes it adds in the task's record."""
        old = self._call(self.chunks.find_one_and_replace, {"task_id": doc["task_id"], "first": doc["first"]},
                         doc, projection={"bytes": 1}, upsert=True)
        self._count(doc["task_id"], doc["bytes"] - (old["bytes"] if old else 0))

    def _count(self, task_id: str, delta: int, **fields: Any) -> None:
        if delta or fields:
            update: dict[str, Any] = {"$inc": {"log_bytes": delta}}
            if fields:
                update["$set"] = fields
            self._call(self.tasks.update_one, {"_id": task_id}, update)

    def read_log_chunk(self, task_id: str, after_seq: int = 0) -> tuple[int, list[str]] | None:
        seq = after_seq + 1
        doc = self._call(self.chunks.find_one, {"task_id": task_id, "first": {"$lte": seq}, "last": {"$gte": seq}},
                         sort=[("last", -1)])
        if doc is not None:
            return pick_chunk(after_seq, (doc["first"], unpack_lines(doc["data"])), [])
        later = self._call(self.chunks.find_one, {"task_id": task_id, "first": {"$gt": seq}}, sort=[("first", 1)])
        # an archive of an earlier release: chunks of lines keyed by their first line
        old = self._call(self.logs.find_one, {"task_id": task_id, "chunk": {"$lte": seq}}, sort=[("chunk", -1)])
        covering = (old["chunk"], old["lines"]) if old and old["chunk"] + len(old["lines"]) > seq else None
        old_later = None
        if covering is None:
            nxt = self._call(self.logs.find_one, {"task_id": task_id, "chunk": {"$gt": seq}}, sort=[("chunk", 1)])
            old_later = (nxt["chunk"], nxt["lines"]) if nxt else None
        return pick_chunk(after_seq, covering, [
            (later["first"], unpack_lines(later["data"])) if later else None, old_later])

    def log_info(self, task_id: str) -> ArchiveInfo | None:
        new = self._call(list, self.chunks.find({"task_id": task_id}, {"last": 1, "bytes": 1}))
        old_count = self._call(self.logs.count_documents, {"task_id": task_id})
        if not new and not old_count:
            return None
        last = max((d["last"] for d in new), default=0)
        old_bytes = 0
        if old_count:
            tail = self._call(self.logs.find_one, {"task_id": task_id}, sort=[("chunk", -1)])
            last = max(last, tail["chunk"] + len(tail["lines"]) - 1)
            old_bytes = sum(len(line) + 1 for d in self._call(list, self.logs.find({"task_id": task_id}))
                            for line in d["lines"])
        return ArchiveInfo(last, len(new) + old_count, sum(d["bytes"] for d in new) + old_bytes)

    def delete_log(self, task_id: str) -> int:
        freed = sum(d["bytes"] for d in self._call(list, self.chunks.find({"task_id": task_id}, {"bytes": 1})))
        self._call(self.chunks.delete_many, {"task_id": task_id})
        freed += self._delete_old(task_id)
        self._count(task_id, -freed, log_removed_at=utcnow())
        return freed

    def _delete_old(self, task_id: str) -> int:
        """Remove an archive of an earlier release; its size (about) for the record's count."""
        old = self._call(list, self.logs.find({"task_id": task_id}))
        if old:
            self._call(self.logs.delete_many, {"task_id": task_id})
        return sum(len(line) + 1 for d in old for line in d["lines"])

    def old_log_archives(self, before: datetime, limit: int = 1000) -> list[str]:
        ids = self._call(self.chunks.distinct, "task_id", {"written_at": {"$lt": before}})[:limit]
        if len(ids) < limit:
            ids += self._call(self.logs.distinct, "task_id")[: limit - len(ids)]
        return list(dict.fromkeys(ids))

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

    # -- browser sessions -------------------------------------------------------------------------------
    def create_session(self, session: BrowserSession) -> None:
        self._call(self.sessions.insert_one, {"_id": session.session_hash, **session.to_doc()})

    def get_session(self, session_hash: str) -> BrowserSession | None:
        doc = self._call(self.sessions.find_one, {"_id": session_hash})
        return BrowserSession.from_doc(doc) if doc else None

    def delete_session(self, session_hash: str) -> bool:
        return self._call(self.sessions.delete_one, {"_id": session_hash}).deleted_count > 0  # type: ignore[no-any-return]

    def delete_sessions(self, token_hash: str) -> int:
        return int(self._call(self.sessions.delete_many, {"token_hash": token_hash}).deleted_count)

    def ping(self) -> None:
        self._call(self.db.command, "ping")

    def close(self) -> None:
        self.db.client.close()


def _chunk_doc(task_id: str, first: int, lines: list[str]) -> dict[str, Any]:
    data = pack_lines(lines)
    return {"task_id": task_id, "first": first, "last": first + len(lines) - 1, "bytes": len(data),
            "data": data, "written_at": utcnow()}


def _chunk_docs(task_id: str, first_line: int, lines: list[str]) -> list[dict[str, Any]]:
    chunks = chunk_lines(lines)
    return [_chunk_doc(task_id, first, chunk) for first, chunk in zip(chunk_starts(chunks, first_line), chunks,
                                                                        strict=True)]
