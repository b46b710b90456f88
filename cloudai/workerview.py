"""A worker as ``cloudai workers`` shows it: its record plus what its live tasks use. Light (no Redis or store
imports), shared by the library, the master and the CLI in both modes."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cloudai.models import WorkerInfo

if TYPE_CHECKING:
    from cloudai.models import Task


@dataclass
class WorkerView:
    """A worker with what its live tasks reserve, for ``cloudai workers``."""

    info: WorkerInfo
    alive: bool
    heartbeat_age_s: float
    used_cpus: float
    used_memory: int
    used_gpu_ids: list[str]
    tasks: int
    claimed_by: str | None = None  # the waiting task that has first right to its free resources (backfill)
    # whose use the used_* fields and tasks count: None, everyone's (an operator's or admin's view); a user
    # name, that user's own tasks only (other users' load is theirs)
    usage_of: str | None = None
    has_room: bool | None = None  # a free slot, CPU and memory (None: not known, from an older server)

    def __post_init__(self) -> None:
        if self.has_room is None and self.usage_of is None:
            self.has_room = (self.tasks < self.info.slots and self.used_cpus < self.info.cpus - 1e-9
                             and self.used_memory < self.info.memory)

    def only(self, user: str, tasks: Iterable[Task]) -> WorkerView:
        """This worker as ``user`` may see it: its capacity, state and whether it has room, and what ``user``'s
        own ``tasks`` (those live on it) use of it; never other users' load or claims."""
        mine = [t for t in tasks if t.worker_id == self.info.worker_id]
        return dataclasses.replace(
            self, used_cpus=round(sum(t.req_cpu for t in mine), 3), used_memory=sum(t.memory_bytes for t in mine),
            used_gpu_ids=sorted({g for t in mine for g in t.gpu_ids}), tasks=len(mine), claimed_by=None,
            usage_of=user, has_room=self.has_room)

    def to_doc(self) -> dict[str, Any]:
        """The worker record plus its use, as ``workers --json`` and the API show it."""
        doc = {**self.info.to_doc(), "alive": self.alive, "heartbeat_age_s": round(self.heartbeat_age_s, 1),
               "used_cpus": self.used_cpus, "used_memory": self.used_memory, "used_gpu_ids": self.used_gpu_ids,
               "tasks": self.tasks, "has_room": self.has_room, "usage_of": self.usage_of}
        if self.usage_of is None:
            doc["claimed_by"] = self.claimed_by
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> WorkerView:
        return cls(info=WorkerInfo.from_doc(doc), alive=doc["alive"], heartbeat_age_s=doc["heartbeat_age_s"],
                   used_cpus=doc["used_cpus"], used_memory=doc["used_memory"], used_gpu_ids=doc["used_gpu_ids"],
                   tasks=doc["tasks"], claimed_by=doc.get("claimed_by"), usage_of=doc.get("usage_of"),
                   has_room=doc.get("has_room"))
