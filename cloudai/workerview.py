"""A worker as ``cloudai workers`` shows it: its record plus what its live tasks use. Light (no Redis or store
imports), shared by the library, the master and the CLI in both modes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cloudai.models import WorkerInfo


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

    def to_doc(self) -> dict[str, Any]:
        """The worker record plus its use, as ``workers --json`` and the API show it."""
        return {**self.info.to_doc(), "alive": self.alive, "heartbeat_age_s": round(self.heartbeat_age_s, 1),
                "used_cpus": self.used_cpus, "used_memory": self.used_memory, "used_gpu_ids": self.used_gpu_ids,
                "tasks": self.tasks, "claimed_by": self.claimed_by}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> WorkerView:
        return cls(info=WorkerInfo.from_doc(doc), alive=doc["alive"], heartbeat_age_s=doc["heartbeat_age_s"],
                   used_cpus=doc["used_cpus"], used_memory=doc["used_memory"], used_gpu_ids=doc["used_gpu_ids"],
                   tasks=doc["tasks"], claimed_by=doc.get("claimed_by"))
