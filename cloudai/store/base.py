"""The task store contract. Backends: :mod:`cloudai.store.sqlite` and :mod:`cloudai.store.mongo`;
both pass the same contract suite (tests/contract)."""

from __future__ import annotations

import abc
import dataclasses
import json
import zlib
from collections.abc import Iterable, Iterator
from datetime import datetime
from enum import Enum
from typing import Any

from cloudai.models import Assignment, Quota, Task, TaskStatus, WorkerInfo, WorkerState
from cloudai.sessions import BrowserSession
from cloudai.tokens import ApiToken

StatusFilter = TaskStatus | Iterable[TaskStatus] | None
LOG_CHUNK_BYTES = 1024 * 1024  # archive chunks stay far below Mongo's 16 MB document limit
LOG_CHUNK_LINES = 10_000  # ...and a reader holds at most this many lines of one at a time


@dataclasses.dataclass(frozen=True)
class ArchiveInfo:
    """What a task's log archive holds: its last line's number, its chunks and the bytes they take in the
    store (compressed)."""

    last_line: int
    chunks: int
    stored_bytes: int


def pack_lines(lines: list[str]) -> bytes:
    """An archive chunk as the store keeps it: its lines as a JSON array, zlib-compressed (logs compress 5 to
    10 times; level 1 costs the worker's archiver a few milliseconds a chunk)."""
    return zlib.compress(json.dumps(lines, ensure_ascii=False).encode("utf-8", "surrogatepass"), 1)


def unpack_lines(data: bytes) -> list[str]:
    lines: list[str] = json.loads(zlib.decompress(data).decode("utf-8", "surrogatepass"))
    return lines


def status_values(status: StatusFilter) -> list[str] | None:
    if status is None:
        return None
    if isinstance(status, TaskStatus):
        return [status.value]
    return [TaskStatus(s).value for s in status]


def check_transition(expected: StatusFilter, new: TaskStatus) -> list[str]:
    """The expected statuses as strings; a transition the lifecycle forbids is a programming error."""
    values = status_values(expected) or []
    if not values:
        raise ValueError("a transition needs at least one expected status")
    for value in values:
        if not TaskStatus(value).can_become(new):
            raise ValueError(f"the lifecycle has no transition {value} -> {new.value}")
    return values


def plain_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Field values as a task doc stores them: dataclasses (TaskError) as dicts, enums as their values."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        elif isinstance(value, Enum):
            value = value.value
        out[key] = value
    return out


def chunk_lines(lines: Iterable[str], limit: int = LOG_CHUNK_BYTES,
                max_lines: int = LOG_CHUNK_LINES) -> list[list[str]]:
    """Split an archived log into chunks of at most ``limit`` bytes and ``max_lines`` lines (one huge line makes
    its own chunk)."""
    chunks: list[list[str]] = [[]]
    size = 0
    for line in lines:
        n = len(line.encode("utf-8", "surrogatepass")) + 1
        if chunks[-1] and (size + n > limit or len(chunks[-1]) >= max_lines):
            chunks.append([])
            size = 0
        chunks[-1].append(line)
        size += n
    return chunks if chunks[0] else []


def chunk_starts(chunks: list[list[str]], first: int = 1) -> list[int]:
    """The first line number of each chunk of lines starting at ``first``: an archive chunk is keyed by it."""
    starts = []
    for chunk in chunks:
        starts.append(first)
        first += len(chunk)
    return starts


def pick_chunk(after_seq: int, covering: tuple[int, list[str]] | None,
               later: Iterable[tuple[int, list[str]] | None]) -> tuple[int, list[str]] | None:
    """:meth:`TaskStore.read_log_chunk` from a backend's candidates: the chunk holding line ``after_seq + 1``,
    else the earliest one after it; its lines up to ``after_seq`` left out."""
    chosen = covering
    if chosen is None:
        found = [c for c in later if c is not None and c[1]]
        chosen = min(found, key=lambda c: c[0]) if found else None
    if chosen is None:
        return None
    first, lines = chosen
    skip = max(0, after_seq + 1 - first)
    return first + skip, lines[skip:]


class TaskStore(abc.ABC):
    """Tasks, assignments, workers and archived logs. All methods are safe to call from several threads
    and (SQLite) several processes; every status change is a compare-and-set."""

    url: str

    # -- tasks ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def create_task(self, task: Task) -> None:
        """Record a new task; raises :class:`~cloudai.errors.TaskExists` for a known id."""

    @abc.abstractmethod
    def get_task(self, task_id: str) -> Task | None: ...

    @abc.abstractmethod
    def list_tasks(
        self,
        user_id: str | None = None,
        status: StatusFilter = None,
        worker_id: str | None = None,
        limit: int | None = 50,
    ) -> list[Task]:
        """Tasks matching every filter given, newest first; ``limit=None`` for all."""

    def count_tasks(self, user_id: str, status: StatusFilter = None) -> int:
        """How many of ``user_id``'s tasks are in ``status`` (a submit's waiting-task quota); backends count
        without reading the records."""
        return len(self.list_tasks(user_id=user_id, status=status, limit=None))

    @abc.abstractmethod
    def transition(self, task_id: str, expected: StatusFilter, new: TaskStatus, *, execution: str | None = None,
                   **fields: Any) -> bool:
        """Set ``status=new`` (and ``fields``) only if the status is one of ``expected`` (and, with
        ``execution``, only while that is the task's current attempt). Returns whether this call won.
        Concurrent callers: at most one wins."""

    @abc.abstractmethod
    def update_task(self, task_id: str, expected: StatusFilter = None, *, execution: str | None = None,
                    **fields: Any) -> bool:
        """Set non-status fields, only while the status is one of ``expected`` when given (and, with
        ``execution``, while that is the task's current attempt)."""

    @abc.abstractmethod
    def delete_task(self, task_id: str) -> bool: ...

    def create_assigned(self, task: Task) -> Assignment:
        """Record a new task together with its assignment to ``task.worker_id``: both or neither (a failure
        of the second write removes the first). Raises :class:`~cloudai.errors.TaskExists` for a known id.
        A backend that can write both in one transaction overrides this (a submit's one store round)."""
        if not task.worker_id:
            raise ValueError(f"task {task.task_id} has no worker to be assigned to")
        self.create_task(task)
        try:
            return self.create_assignment(task.task_id, task.worker_id)
        except BaseException:
            self.delete_task(task.task_id)
            raise

    # -- assignments (the seed's table) -----------------------------------------------------------------
    @abc.abstractmethod
    def create_assignment(self, task_id: str, worker_id: str) -> Assignment:
        """Assign ``task_id`` to ``worker_id``, replacing an earlier assignment of the same task."""

    @abc.abstractmethod
    def get_assignment(self, task_id: str) -> Assignment | None: ...

    @abc.abstractmethod
    def list_assignments(self, worker_id: str) -> list[Assignment]: ...

    @abc.abstractmethod
    def delete_assignment(self, task_id: str) -> bool: ...

    def worker_for_task(self, task_id: str) -> str | None:
        assignment = self.get_assignment(task_id)
        return assignment.worker_id if assignment else None

    # -- workers ----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def upsert_worker(self, worker: WorkerInfo) -> None: ...

    @abc.abstractmethod
    def heartbeat(self, worker_id: str, at: datetime | None = None) -> bool:
        """Refresh ``last_heartbeat``; returns False for an unknown worker."""

    @abc.abstractmethod
    def get_worker(self, worker_id: str) -> WorkerInfo | None: ...

    @abc.abstractmethod
    def list_workers(self) -> list[WorkerInfo]: ...

    def workers_version(self) -> object | None:
        """A value that changes whenever any worker record changes (registered, heartbeat, state, removed),
        read more cheaply than :meth:`list_workers`: a placement lists the workers again only when it
        changed. Read it *before* listing (a change in between then shows as a new version next time).
        None: the backend can't tell, and callers list the workers every time."""
        return None

    @abc.abstractmethod
    def set_worker_state(
        self, worker_id: str, state: WorkerState, expected: WorkerState | None = None
    ) -> bool: ...

    @abc.abstractmethod
    def delete_worker(self, worker_id: str) -> bool: ...

    # -- quotas (admin-set, per user) -------------------------------------------------------------------
    @abc.abstractmethod
    def set_quota(self, quota: Quota) -> None:
        """Create or replace ``quota.user_id``'s quota."""

    @abc.abstractmethod
    def get_quota(self, user_id: str) -> Quota | None: ...

    @abc.abstractmethod
    def list_quotas(self) -> list[Quota]:
        """Every quota, by user id."""

    @abc.abstractmethod
    def delete_quota(self, user_id: str) -> bool:
        """Remove a user's quota; returns whether there was one."""

    # -- log archive ------------------------------------------------------------------------------------
    # A task's archived log is a set of compressed chunks (pack_lines), each keyed by its first line's number,
    # at most LOG_CHUNK_BYTES and LOG_CHUNK_LINES each, whoever writes them. The task record's ``log_bytes``
    # counts what they take in the store. Archives written by earlier releases (uncompressed chunks) are read
    # the same way.
    @abc.abstractmethod
    def save_log(self, task_id: str, lines: list[str]) -> None:
        """Archive a finished task's full log, replacing an earlier archive."""

    @abc.abstractmethod
    def append_log(self, task_id: str, first_line: int, lines: list[str], execution: str | None = None) -> bool:
        """Archive ``lines`` as lines ``first_line``, ``first_line + 1``, ... of the task's log, while it runs
        (memory stays flat in the log's length), in chunks of the bounds above. Writing the same lines again
        replaces their chunks, so a retry never duplicates a line. With ``execution``, only while that is the
        task's current attempt; returns whether the lines were written."""

    @abc.abstractmethod
    def read_log_chunk(self, task_id: str, after_seq: int = 0) -> tuple[int, list[str]] | None:
        """The archived chunk holding line ``after_seq + 1`` (else the first chunk after it) as its first line's
        number and its lines, those up to ``after_seq`` left out; None past the archive's end. One chunk's
        worth of memory, whatever the log's length."""

    def iter_log(self, task_id: str, after_seq: int = 0) -> Iterator[tuple[int, list[str]]]:
        """The archived log after line ``after_seq``, chunk by chunk as ``(first line number, lines)``; a reader
        holds one chunk at a time, however long the log and however many read it."""
        seq = after_seq
        while (chunk := self.read_log_chunk(task_id, seq)) is not None:
            first, lines = chunk
            if not lines:
                return
            yield first, lines
            seq = first + len(lines) - 1

    def read_log(self, task_id: str) -> list[str] | None:
        """The whole archived log in memory (tests, small logs: readers of any size use :meth:`iter_log`), or
        None when none was saved."""
        if self.log_info(task_id) is None:
            return None
        return [line for _first, lines in self.iter_log(task_id) for line in lines]

    @abc.abstractmethod
    def log_info(self, task_id: str) -> ArchiveInfo | None:
        """What the task's archive holds; None when it has none."""

    @abc.abstractmethod
    def delete_log(self, task_id: str) -> int:
        """Remove the task's archive (the record's ``log_bytes`` becomes 0 and ``log_removed_at`` is set);
        returns the bytes it took."""

    @abc.abstractmethod
    def old_log_archives(self, before: datetime, limit: int = 1000) -> list[str]:
        """Ids of tasks whose archive has a chunk written before ``before`` (archives of earlier releases,
        which carry no date, are all listed): candidates for the retention job, which asks each task's record."""

    # -- API tokens (only their SHA-256; see cloudai.tokens) ---------------------------------------------------
    @abc.abstractmethod
    def create_token(self, token: ApiToken) -> None:
        """Record a new token."""

    @abc.abstractmethod
    def get_token(self, token_hash: str) -> ApiToken | None: ...

    @abc.abstractmethod
    def list_tokens(self, user_id: str | None = None) -> list[ApiToken]:
        """Tokens (of ``user_id`` when given), oldest first."""

    @abc.abstractmethod
    def revoke_token(self, token_hash: str) -> bool:
        """Mark a token revoked; False for an unknown one."""

    @abc.abstractmethod
    def touch_token(self, token_hash: str, at: datetime) -> None:
        """Record the token's last use."""

    # -- browser sessions (only the SHA-256 of their ids; see cloudai.sessions) --------------------------------
    @abc.abstractmethod
    def create_session(self, session: BrowserSession) -> None:
        """Record a new session (and forget expired ones: the sessions kept stay few)."""

    @abc.abstractmethod
    def get_session(self, session_hash: str) -> BrowserSession | None:
        """The session, or None (an expired one may still be returned: the caller checks ``expires_at``)."""

    @abc.abstractmethod
    def delete_session(self, session_hash: str) -> bool:
        """Forget a session (sign-out); False for an unknown one."""

    @abc.abstractmethod
    def delete_sessions(self, token_hash: str) -> int:
        """Forget every session bound to a token (it was revoked); how many there were."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise :class:`~cloudai.errors.StoreUnavailable` when the store can't be reached."""

    def close(self) -> None:  # noqa: B027 - optional for backends
        """Release connections."""
