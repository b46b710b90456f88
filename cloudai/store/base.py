"""The task store contract. Backends: :mod:`cloudai.store.sqlite` and :mod:`cloudai.store.mongo`;
both pass the same contract suite (tests/contract)."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterable
from datetime import datetime
from enum import Enum
from typing import Any

from cloudai.models import Assignment, Quota, Task, TaskStatus, WorkerInfo, WorkerState
from cloudai.tokens import ApiToken

StatusFilter = TaskStatus | Iterable[TaskStatus] | None
LOG_CHUNK_BYTES = 1024 * 1024  # archive chunks stay far below Mongo's 16 MB document limit


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


def chunk_lines(lines: Iterable[str], limit: int = LOG_CHUNK_BYTES) -> list[list[str]]:
    """Split an archived log into chunks of at most ``limit`` bytes (one huge line makes its own chunk)."""
    chunks: list[list[str]] = [[]]
    size = 0
    for line in lines:
        n = len(line.encode("utf-8", "surrogatepass")) + 1
        if chunks[-1] and size + n > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(line)
        size += n
    return chunks if chunks[0] else []


def chunk_starts(chunks: list[list[str]]) -> list[int]:
    """The first line number (1-based) of each chunk of a whole log: an archive chunk is keyed by it."""
    starts, first = [], 1
    for chunk in chunks:
        starts.append(first)
        first += len(chunk)
    return starts


def merge_chunks(chunks: Iterable[tuple[int, list[str]]]) -> list[str]:
    """The archived log from ``(first_line, lines)`` chunks in first-line order; a line two chunks both hold
    (a chunk written again with other bounds) is kept once."""
    out: list[str] = []
    covered = 0
    for first, lines in chunks:
        for n, line in enumerate(lines, start=max(first, 1)):
            if n > covered:
                out.append(line)
                covered = n
    return out


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
    @abc.abstractmethod
    def save_log(self, task_id: str, lines: list[str]) -> None:
        """Archive a finished task's full log, replacing an earlier archive."""

    @abc.abstractmethod
    def append_log(self, task_id: str, first_line: int, lines: list[str], execution: str | None = None) -> bool:
        """Archive ``lines`` as lines ``first_line``, ``first_line + 1``, ... of the task's log, while it runs
        (memory stays flat in the log's length). Writing the same chunk again replaces it, so a retry never
        duplicates a line. With ``execution``, only while that is the task's current attempt; returns whether
        the chunk was written."""

    @abc.abstractmethod
    def read_log(self, task_id: str) -> list[str] | None:
        """The archived log, or None when none was saved."""

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

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise :class:`~cloudai.errors.StoreUnavailable` when the store can't be reached."""

    def close(self) -> None:  # noqa: B027 - optional for backends
        """Release connections."""
