"""The queue message: one frozen, versioned dataclass, the only wire format between the master (dispatch) and
a worker (``cloudai.run_container``). It carries the attempt's identity (its execution id) and the full spec,
so a worker can run it while the store is briefly down and Flower shows readable arguments."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from cloudai.errors import CloudAIError
from cloudai.models import Task

# 3: args, entrypoint, mounts, shm_size, container_user, ipc, ulimits (docker run semantics; volumes)
# 2: memory_bytes (bytes) replaced memory (text such as '64 MiB')
WIRE_VERSION = 3


class MessageError(CloudAIError):
    """A queue message this worker can't read (another version, or fields missing)."""


@dataclass(frozen=True)
class RunMessage:
    """Run attempt ``attempt`` (execution ``execution_id``) of task ``task_id`` on worker ``worker_id``."""

    task_id: str
    execution_id: str
    attempt: int
    worker_id: str
    user: str = ""
    image: str = ""
    command: str | None = None
    cpus: float = 1.0
    memory_bytes: int = 0
    gpu_ids: tuple[str, ...] = field(default_factory=tuple)
    timeout_s: float | None = None
    args: tuple[str, ...] = field(default_factory=tuple)  # what runs; ``command`` is it as one readable line
    entrypoint: str | None = None
    mounts: tuple[str, ...] = field(default_factory=tuple)
    shm_size: int | None = None
    container_user: str | None = None
    ipc: str | None = None
    ulimits: tuple[str, ...] = field(default_factory=tuple)
    version: int = WIRE_VERSION

    @classmethod
    def from_task(cls, task: Task) -> RunMessage:
        if not task.worker_id:
            raise MessageError(f"task {task.task_id} has no worker; only a placed task has a message")
        return cls(task_id=task.task_id, execution_id=task.execution_id, attempt=task.attempt,
                   worker_id=task.worker_id, user=task.user_id, image=task.docker_image, command=task.command,
                   cpus=task.req_cpu, memory_bytes=task.memory_bytes, gpu_ids=tuple(task.gpu_ids),
                   timeout_s=task.timeout_s, args=tuple(task.args), entrypoint=task.entrypoint,
                   mounts=tuple(task.mounts), shm_size=task.shm_size, container_user=task.container_user,
                   ipc=task.ipc, ulimits=tuple(task.ulimits))

    def to_wire(self) -> dict[str, Any]:
        """A JSON-able dict (what Celery carries and Flower shows)."""
        wire = asdict(self)
        for name in _LISTS:
            wire[name] = list(getattr(self, name))
        return wire

    @classmethod
    def from_wire(cls, wire: Any) -> RunMessage:
        """Parse a message; raises :class:`MessageError` naming what is wrong (an unknown version, a missing
        field) instead of guessing."""
        if not isinstance(wire, dict):
            raise MessageError(f"a run message is a JSON object, got {type(wire).__name__}")
        version = wire.get("version")
        if version != WIRE_VERSION:
            raise MessageError(
                f"run message version {version!r} is not understood by this worker (it reads version "
                f"{WIRE_VERSION}); run the same CloudAI release on the master and the workers"
            )
        missing = [k for k in ("task_id", "execution_id", "attempt", "worker_id") if not wire.get(k)]
        if missing:
            raise MessageError(f"run message lacks {', '.join(missing)}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(wire) - known)
        if unknown:
            raise MessageError(f"run message version {version} has unknown fields {', '.join(unknown)}")
        data = dict(wire)
        for name in _LISTS:
            data[name] = tuple(str(v) for v in data.get(name) or ())
        data["attempt"] = int(data["attempt"])
        return cls(**data)


_LISTS = ("gpu_ids", "args", "mounts", "ulimits")  # tuples here, JSON lists on the wire
