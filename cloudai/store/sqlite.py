"""SQLite task store for a single host (the demo, tests, small set-ups). WAL mode and a busy timeout make it
safe for several processes; every read-modify-write runs in ``BEGIN IMMEDIATE`` so compare-and-set holds
across processes."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from cloudai.errors import StoreUnavailable, TaskExists
from cloudai.models import Assignment, Quota, Task, TaskStatus, WorkerInfo, WorkerState, as_utc, utcnow
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

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, status TEXT NOT NULL, worker_id TEXT,
    created_at TEXT NOT NULL, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS tasks_user_created ON tasks(user_id, created_at);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks(status);
CREATE INDEX IF NOT EXISTS tasks_user_status ON tasks(user_id, status);
CREATE INDEX IF NOT EXISTS tasks_worker ON tasks(worker_id);
CREATE INDEX IF NOT EXISTS tasks_created ON tasks(created_at);
CREATE TABLE IF NOT EXISTS assignments (
    task_id TEXT PRIMARY KEY, ass_id TEXT NOT NULL, worker_id TEXT NOT NULL, assigned_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS assignments_worker ON assignments(worker_id);
CREATE TABLE IF NOT EXISTS workers (worker_id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters(name, value) VALUES ('workers', 0);
CREATE TRIGGER IF NOT EXISTS workers_inserted AFTER INSERT ON workers
    BEGIN UPDATE counters SET value = value + 1 WHERE name = 'workers'; END;
CREATE TRIGGER IF NOT EXISTS workers_updated AFTER UPDATE ON workers
    BEGIN UPDATE counters SET value = value + 1 WHERE name = 'workers'; END;
CREATE TRIGGER IF NOT EXISTS workers_deleted AFTER DELETE ON workers
    BEGIN UPDATE counters SET value = value + 1 WHERE name = 'workers'; END;
CREATE TABLE IF NOT EXISTS quotas (user_id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS log_archive (
    task_id TEXT NOT NULL, chunk INTEGER NOT NULL, text TEXT NOT NULL, PRIMARY KEY (task_id, chunk));
CREATE TABLE IF NOT EXISTS log_chunks (
    task_id TEXT NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL, bytes INTEGER NOT NULL,
    written_at TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY (task_id, first));
CREATE INDEX IF NOT EXISTS log_chunks_last ON log_chunks(task_id, last);
CREATE INDEX IF NOT EXISTS log_chunks_written ON log_chunks(written_at);
CREATE TABLE IF NOT EXISTS api_tokens (
    token_hash TEXT PRIMARY KEY, user_id TEXT NOT NULL, created_at TEXT NOT NULL, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS browser_sessions (
    session_hash TEXT PRIMARY KEY, token_hash TEXT NOT NULL, expires_at TEXT NOT NULL, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS browser_sessions_token ON browser_sessions(token_hash);
CREATE INDEX IF NOT EXISTS browser_sessions_expires ON browser_sessions(expires_at);
"""


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return as_utc(value).isoformat()  # type: ignore[union-attr]
    raise TypeError(f"can't store {type(value).__name__}")


def _dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, default=_encode)


def _blob(lines: list[str]) -> tuple[int, bytes]:
    data = pack_lines(lines)
    return len(data), data


def _packed(task_id: str, first_line: int, lines: list[str]) -> list[tuple[str, int, int, int, bytes]]:
    """Rows of log_chunks for lines ``first_line``, ...: (task, first, last, bytes, data)."""
    chunks = chunk_lines(lines)
    return [(task_id, first, first + len(chunk) - 1, *_blob(chunk))
            for first, chunk in zip(chunk_starts(chunks, first_line), chunks, strict=True)]


def _ts(value: datetime) -> str:
    # fixed-width ISO text sorts in time order
    return as_utc(value).strftime("%Y-%m-%dT%H:%M:%S.%f")  # type: ignore[union-attr]


class SQLiteStore(TaskStore):
    """Store on one SQLite file; one connection per thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self._local = threading.local()
        self._parsed_workers: dict[str, WorkerInfo] = {}
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, exist_ok=True)
            self._conn().executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(self.url, exc) from exc

    @staticmethod
    def path_of(url: str) -> str:
        """The file a ``sqlite://`` URL names (``:memory:`` for none)."""
        path = url[len("sqlite://") :]
        if path.startswith("/") and not path.startswith("//"):
            path = path[1:] or ":memory:"  # sqlite:///rel.db -> rel.db ; sqlite:////abs.db -> /abs.db
        elif path.startswith("//"):
            path = path[1:]
        if not path:
            raise StoreUnavailable(url, "no file path; use sqlite:///path/to/file.db")
        return path

    @classmethod
    def from_url(cls, url: str) -> SQLiteStore:
        return cls(cls.path_of(url))

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the database's write lock up front, so read-check-write is atomic."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:  # locked past the busy timeout, or the file went away
            raise StoreUnavailable(self.url, exc) from exc
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            conn.execute("ROLLBACK")
            raise StoreUnavailable(self.url, exc) from exc

    # -- tasks ------------------------------------------------------------------------------------------
    def create_task(self, task: Task) -> None:
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO tasks(task_id, user_id, status, worker_id, created_at, doc) VALUES (?,?,?,?,?,?)",
                    (task.task_id, task.user_id, task.status.value, task.worker_id, _ts(task.created_at),
                     _dumps(task.to_doc())),
                )
        except sqlite3.IntegrityError:
            raise TaskExists(f"task {task.task_id!r} already exists") from None

    def get_task(self, task_id: str) -> Task | None:
        row = self._conn().execute("SELECT doc FROM tasks WHERE task_id=?", (task_id,)).fetchone()
        return Task.from_doc(json.loads(row["doc"])) if row else None

    def list_tasks(
        self,
        user_id: str | None = None,
        status: StatusFilter = None,
        worker_id: str | None = None,
        limit: int | None = 50,
    ) -> list[Task]:
        where, args = [], []  # type: list[str], list[Any]
        if user_id is not None:
            where.append("user_id=?")
            args.append(user_id)
        statuses = status_values(status)
        if statuses is not None:
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            args.extend(statuses)
        if worker_id is not None:
            where.append("worker_id=?")
            args.append(worker_id)
        sql = "SELECT doc FROM tasks"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, rowid DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [Task.from_doc(json.loads(r["doc"])) for r in self._conn().execute(sql, args)]

    def count_tasks(self, user_id: str, status: StatusFilter = None) -> int:
        sql, args = "SELECT COUNT(*) FROM tasks WHERE user_id=?", [user_id]
        statuses = status_values(status)
        if statuses is not None:
            sql += f" AND status IN ({','.join('?' * len(statuses))})"
            args.extend(statuses)
        return int(self._conn().execute(sql, args).fetchone()[0])

    def _modify(self, task_id: str, expected: list[str] | None, fields: dict[str, Any],
                execution: str | None = None) -> bool:
        with self._tx() as db:
            row = db.execute("SELECT status, doc FROM tasks WHERE task_id=?", (task_id,)).fetchone()
            if row is None or (expected is not None and row["status"] not in expected):
                return False
            doc = json.loads(row["doc"])
            if execution is not None and doc.get("execution_id") != execution:
                return False  # a write of an attempt that is no longer the task's current one
            doc.update(Task.from_doc({**doc, **fields}).to_doc())  # validates field names and types
            db.execute(
                "UPDATE tasks SET status=?, worker_id=?, doc=? WHERE task_id=?",
                (doc["status"], doc.get("worker_id"), _dumps(doc), task_id),
            )
            return True

    def transition(self, task_id: str, expected: StatusFilter, new: TaskStatus, *, execution: str | None = None,
                   **fields: Any) -> bool:
        values = check_transition(expected, new)
        return self._modify(task_id, values, {**plain_fields(fields), "status": new.value}, execution)

    def update_task(self, task_id: str, expected: StatusFilter = None, *, execution: str | None = None,
                    **fields: Any) -> bool:
        fields.pop("status", None)
        return self._modify(task_id, status_values(expected), plain_fields(fields), execution)

    def create_assigned(self, task: Task) -> Assignment:
        if not task.worker_id:
            raise ValueError(f"task {task.task_id} has no worker to be assigned to")
        assignment = Assignment(ass_id=uuid.uuid4().hex, task_id=task.task_id, worker_id=task.worker_id)
        try:
            with self._tx() as db:  # one transaction: both rows or neither, one commit per submit
                db.execute(
                    "INSERT INTO tasks(task_id, user_id, status, worker_id, created_at, doc) VALUES (?,?,?,?,?,?)",
                    (task.task_id, task.user_id, task.status.value, task.worker_id, _ts(task.created_at),
                     _dumps(task.to_doc())),
                )
                db.execute(
                    "INSERT OR REPLACE INTO assignments(task_id, ass_id, worker_id, assigned_at) VALUES (?,?,?,?)",
                    (task.task_id, assignment.ass_id, task.worker_id, assignment.assigned_at.isoformat()),
                )
        except sqlite3.IntegrityError:
            raise TaskExists(f"task {task.task_id!r} already exists") from None
        return assignment

    def delete_task(self, task_id: str) -> bool:
        with self._tx() as db:
            db.execute("DELETE FROM assignments WHERE task_id=?", (task_id,))
            db.execute("DELETE FROM log_archive WHERE task_id=?", (task_id,))
            db.execute("DELETE FROM log_chunks WHERE task_id=?", (task_id,))
            return db.execute("DELETE FROM tasks WHERE task_id=?", (task_id,)).rowcount > 0

    # -- assignments ------------------------------------------------------------------------------------
    def create_assignment(self, task_id: str, worker_id: str) -> Assignment:
        assignment = Assignment(ass_id=uuid.uuid4().hex, task_id=task_id, worker_id=worker_id)
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO assignments(task_id, ass_id, worker_id, assigned_at) VALUES (?,?,?,?)",
                (task_id, assignment.ass_id, worker_id, assignment.assigned_at.isoformat()),
            )
        return assignment

    @staticmethod
    def _assignment(row: sqlite3.Row) -> Assignment:
        return Assignment(row["ass_id"], row["task_id"], row["worker_id"], as_utc(row["assigned_at"]))  # type: ignore[arg-type]

    def get_assignment(self, task_id: str) -> Assignment | None:
        row = self._conn().execute("SELECT * FROM assignments WHERE task_id=?", (task_id,)).fetchone()
        return self._assignment(row) if row else None

    def list_assignments(self, worker_id: str) -> list[Assignment]:
        rows = self._conn().execute(
            "SELECT * FROM assignments WHERE worker_id=? ORDER BY assigned_at", (worker_id,)
        )
        return [self._assignment(r) for r in rows]

    def delete_assignment(self, task_id: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM assignments WHERE task_id=?", (task_id,)).rowcount > 0

    # -- workers ----------------------------------------------------------------------------------------
    def upsert_worker(self, worker: WorkerInfo) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO workers(worker_id, doc) VALUES (?,?)",
                (worker.worker_id, _dumps(worker.to_doc())),
            )

    def _update_worker(self, worker_id: str, expected: WorkerState | None, **fields: Any) -> bool:
        with self._tx() as db:
            row = db.execute("SELECT doc FROM workers WHERE worker_id=?", (worker_id,)).fetchone()
            if row is None:
                return False
            doc = json.loads(row["doc"])
            if expected is not None and doc["state"] != expected.value:
                return False
            doc.update(fields)
            db.execute("UPDATE workers SET doc=? WHERE worker_id=?", (_dumps(doc), worker_id))
            return True

    def heartbeat(self, worker_id: str, at: datetime | None = None) -> bool:
        return self._update_worker(worker_id, None, last_heartbeat=at or utcnow())

    def get_worker(self, worker_id: str) -> WorkerInfo | None:
        row = self._conn().execute("SELECT doc FROM workers WHERE worker_id=?", (worker_id,)).fetchone()
        return WorkerInfo.from_doc(json.loads(row["doc"])) if row else None

    def workers_version(self) -> object | None:
        # bumped by triggers on the workers table, in the same transaction as the change, by any process
        try:
            row = self._conn().execute("SELECT value FROM counters WHERE name='workers'").fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable(self.url, exc) from exc
        return row[0] if row else None

    def list_workers(self) -> list[WorkerInfo]:
        rows = self._conn().execute("SELECT doc FROM workers ORDER BY worker_id").fetchall()
        return [self._worker(r["doc"]) for r in rows]

    def _worker(self, doc: str) -> WorkerInfo:
        # every placement lists the workers: parse each distinct record once (a copy, so callers may change it)
        cache = self._parsed_workers
        info = cache.get(doc)
        if info is None:
            if len(cache) > 4096:
                cache.clear()
            info = cache[doc] = WorkerInfo.from_doc(json.loads(doc))
        # a shallow copy without re-running __init__ (the record was checked when parsed): dataclasses.replace
        # costs 5 us a worker, as much as the whole query for 50 workers
        copy = object.__new__(WorkerInfo)
        copy.__dict__.update(info.__dict__)
        copy.gpu_ids, copy.labels = list(info.gpu_ids), dict(info.labels)
        return copy

    def set_worker_state(self, worker_id: str, state: WorkerState, expected: WorkerState | None = None) -> bool:
        return self._update_worker(worker_id, expected, state=state.value)

    def delete_worker(self, worker_id: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM workers WHERE worker_id=?", (worker_id,)).rowcount > 0

    # -- quotas -----------------------------------------------------------------------------------------
    def set_quota(self, quota: Quota) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO quotas(user_id, doc) VALUES (?,?)",
                       (quota.user_id, _dumps(quota.to_doc())))

    def get_quota(self, user_id: str) -> Quota | None:
        row = self._conn().execute("SELECT doc FROM quotas WHERE user_id=?", (user_id,)).fetchone()
        return Quota.from_doc(json.loads(row["doc"])) if row else None

    def list_quotas(self) -> list[Quota]:
        rows = self._conn().execute("SELECT doc FROM quotas ORDER BY user_id")
        return [Quota.from_doc(json.loads(r["doc"])) for r in rows]

    def delete_quota(self, user_id: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM quotas WHERE user_id=?", (user_id,)).rowcount > 0

    # -- log archive ------------------------------------------------------------------------------------
    # log_chunks: compressed chunks (this release); log_archive: the uncompressed JSON chunks of earlier
    # releases, read as they are and removed with their task's archive
    def save_log(self, task_id: str, lines: list[str]) -> None:
        chunks = _packed(task_id, 1, lines) if lines else [(task_id, 0, 0, *_blob([]))]
        with self._tx() as db:
            freed = self._delete_log(db, task_id)
            self._write_chunks(db, task_id, chunks, -freed)

    def append_log(self, task_id: str, first_line: int, lines: list[str], execution: str | None = None) -> bool:
        chunks = _packed(task_id, first_line, lines)  # compressed before the write lock is taken
        with self._tx() as db:
            row = db.execute("SELECT doc FROM tasks WHERE task_id=?", (task_id,)).fetchone()
            if execution is not None and (row is None or json.loads(row["doc"]).get("execution_id") != execution):
                return False
            self._write_chunks(db, task_id, chunks, 0)
        return True

    def _write_chunks(self, db: sqlite3.Connection, task_id: str,
                      chunks: list[tuple[str, int, int, int, bytes]], delta: int) -> None:
        """Write chunks (replacing those with the same first line) and count the bytes in the task's record."""
        for _task, first, _last, size, _data in chunks:
            old = db.execute("SELECT bytes FROM log_chunks WHERE task_id=? AND first=?", (task_id, first)).fetchone()
            delta += size - (old["bytes"] if old else 0)
        now = _ts(utcnow())
        db.executemany("INSERT OR REPLACE INTO log_chunks(task_id, first, last, bytes, data, written_at) "
                       "VALUES (?,?,?,?,?,?)", [(*chunk, now) for chunk in chunks])
        self._count_log_bytes(db, task_id, delta)

    def _count_log_bytes(self, db: sqlite3.Connection, task_id: str, delta: int, **fields: Any) -> None:
        row = db.execute("SELECT doc FROM tasks WHERE task_id=?", (task_id,)).fetchone()
        if row is None or (not delta and not fields):
            return
        doc = json.loads(row["doc"])
        doc["log_bytes"] = max(0, int(doc.get("log_bytes") or 0) + delta)
        doc.update(fields)
        db.execute("UPDATE tasks SET doc=? WHERE task_id=?", (_dumps(doc), task_id))

    def read_log_chunk(self, task_id: str, after_seq: int = 0) -> tuple[int, list[str]] | None:
        db = self._conn()
        seq = after_seq + 1
        row = db.execute("SELECT first, data FROM log_chunks WHERE task_id=? AND first<=? AND last>=? "
                         "ORDER BY last DESC LIMIT 1", (task_id, seq, seq)).fetchone()
        if row is not None:
            return pick_chunk(after_seq, (row["first"], unpack_lines(row["data"])), [])
        later = db.execute("SELECT first, data FROM log_chunks WHERE task_id=? AND first>? ORDER BY first LIMIT 1",
                           (task_id, seq)).fetchone()
        # an archive of an earlier release: chunks of JSON text keyed by their first line
        old = db.execute("SELECT chunk, text FROM log_archive WHERE task_id=? AND chunk<=? ORDER BY chunk DESC "
                         "LIMIT 1", (task_id, seq)).fetchone()
        covering = None
        if old is not None:
            lines = json.loads(old["text"])
            if old["chunk"] + len(lines) > seq:
                covering = (old["chunk"], lines)
        old_later = None
        if covering is None:
            next_old = db.execute("SELECT chunk, text FROM log_archive WHERE task_id=? AND chunk>? ORDER BY chunk "
                                  "LIMIT 1", (task_id, seq)).fetchone()
            old_later = (next_old["chunk"], json.loads(next_old["text"])) if next_old else None
        return pick_chunk(after_seq, covering, [
            (later["first"], unpack_lines(later["data"])) if later else None, old_later])

    def log_info(self, task_id: str) -> ArchiveInfo | None:
        db = self._conn()
        new = db.execute("SELECT COUNT(*) AS n, MAX(last) AS last, SUM(bytes) AS size FROM log_chunks "
                         "WHERE task_id=?", (task_id,)).fetchone()
        old = db.execute("SELECT COUNT(*) AS n, SUM(length(text)) AS size FROM log_archive WHERE task_id=?",
                         (task_id,)).fetchone()
        if not new["n"] and not old["n"]:
            return None
        last = new["last"] or 0
        if old["n"]:
            tail = db.execute("SELECT chunk, text FROM log_archive WHERE task_id=? ORDER BY chunk DESC LIMIT 1",
                              (task_id,)).fetchone()
            last = max(last, tail["chunk"] + len(json.loads(tail["text"])) - 1)
        return ArchiveInfo(last, new["n"] + old["n"], (new["size"] or 0) + (old["size"] or 0))

    def delete_log(self, task_id: str) -> int:
        with self._tx() as db:
            freed = self._delete_log(db, task_id)
            self._count_log_bytes(db, task_id, -freed, log_removed_at=utcnow().isoformat())
        return freed

    @staticmethod
    def _delete_log(db: sqlite3.Connection, task_id: str) -> int:
        freed = db.execute("SELECT COALESCE(SUM(bytes), 0) AS n FROM log_chunks WHERE task_id=?", (task_id,))
        size = int(freed.fetchone()["n"])
        db.execute("DELETE FROM log_chunks WHERE task_id=?", (task_id,))
        db.execute("DELETE FROM log_archive WHERE task_id=?", (task_id,))
        return size

    def old_log_archives(self, before: datetime, limit: int = 1000) -> list[str]:
        db = self._conn()
        ids = [r["task_id"] for r in db.execute(
            "SELECT DISTINCT task_id FROM log_chunks WHERE written_at<? LIMIT ?", (_ts(before), int(limit)))]
        ids += [r["task_id"] for r in db.execute("SELECT DISTINCT task_id FROM log_archive LIMIT ?",
                                                 (max(0, int(limit) - len(ids)),))]
        return list(dict.fromkeys(ids))

    # -- API tokens -------------------------------------------------------------------------------------
    def create_token(self, token: ApiToken) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO api_tokens(token_hash, user_id, created_at, doc) VALUES (?,?,?,?)",
                       (token.token_hash, token.user_id, _ts(token.created_at), _dumps(token.to_doc())))

    def get_token(self, token_hash: str) -> ApiToken | None:
        row = self._conn().execute("SELECT doc FROM api_tokens WHERE token_hash=?", (token_hash,)).fetchone()
        return ApiToken.from_doc(json.loads(row["doc"])) if row else None

    def list_tokens(self, user_id: str | None = None) -> list[ApiToken]:
        sql, args = "SELECT doc FROM api_tokens", []  # type: str, list[Any]
        if user_id is not None:
            sql, args = sql + " WHERE user_id=?", [user_id]
        rows = self._conn().execute(sql + " ORDER BY created_at, rowid", args)
        return [ApiToken.from_doc(json.loads(r["doc"])) for r in rows]

    def _update_token(self, token_hash: str, **fields: Any) -> bool:
        with self._tx() as db:
            row = db.execute("SELECT doc FROM api_tokens WHERE token_hash=?", (token_hash,)).fetchone()
            if row is None:
                return False
            doc = {**json.loads(row["doc"]), **fields}
            db.execute("UPDATE api_tokens SET doc=? WHERE token_hash=?", (_dumps(doc), token_hash))
            return True

    def revoke_token(self, token_hash: str) -> bool:
        return self._update_token(token_hash, revoked=True)

    def touch_token(self, token_hash: str, at: datetime) -> None:
        self._update_token(token_hash, last_used_at=at)

    # -- browser sessions -------------------------------------------------------------------------------
    def create_session(self, session: BrowserSession) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM browser_sessions WHERE expires_at <= ?", (_ts(session.created_at),))
            db.execute("INSERT INTO browser_sessions(session_hash, token_hash, expires_at, doc) VALUES (?,?,?,?)",
                       (session.session_hash, session.token_hash, _ts(session.expires_at),
                        _dumps(session.to_doc())))

    def get_session(self, session_hash: str) -> BrowserSession | None:
        row = self._conn().execute("SELECT doc FROM browser_sessions WHERE session_hash=?",
                                   (session_hash,)).fetchone()
        return BrowserSession.from_doc(json.loads(row["doc"])) if row else None

    def delete_session(self, session_hash: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM browser_sessions WHERE session_hash=?", (session_hash,)).rowcount > 0

    def delete_sessions(self, token_hash: str) -> int:
        with self._tx() as db:
            return int(db.execute("DELETE FROM browser_sessions WHERE token_hash=?", (token_hash,)).rowcount)

    def ping(self) -> None:
        try:
            self._conn().execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise StoreUnavailable(self.url, exc) from exc

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

