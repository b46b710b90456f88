"""Value objects: resources as users type them, task specs and records, workers, the task lifecycle."""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

from cloudai.errors import ValidationError
from cloudai.limits import MAX_CPUS, MAX_GPUS, MAX_MEMORY_BYTES, MAX_TIMEOUT_S
from cloudai.limits import MIN_MEMORY_BYTES as MIN_MEMORY

GiB = 1024**3
MiB = 1024**2

_UNITS = {"": 1, "b": 1, "k": 1024, "m": MiB, "g": GiB, "t": 1024**4}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([bkmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_SIZE_FORMS = "use a size such as 512m, 4g, 4GiB or 1.5g (k/m/g/t are powers of 1024; a bare number is bytes)"
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])", re.IGNORECASE)
_DURATION_FORMS = "use seconds (90) or units s/m/h/d such as 30s, 30m, 2h, 1h30m"


def utcnow() -> datetime:
    """Timezone-aware UTC now, to the millisecond (what MongoDB keeps), so every backend stores the same."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


_created_lock = threading.Lock()
_last_created: datetime | None = None


def next_created_at() -> datetime:
    """``utcnow()``, but strictly increasing within a process: tasks one client submits keep their order
    even at the store's millisecond precision (pending tasks are placed in submit order)."""
    global _last_created
    with _created_lock:
        now = utcnow()
        if _last_created is not None and now <= _last_created:
            now = _last_created + timedelta(milliseconds=1)
        _last_created = now
        return now


def parse_size(value: str | float | int, field_name: str = "memory") -> int:
    """Bytes from ``512m``, ``4g``, ``4GiB``, ``4GB`` or a bare number of bytes, as ``docker run -m`` reads
    them. A bare number below Docker's 6 MiB minimum is refused with the unit it most likely lacked: it is
    almost always GB meant (``-m 4``), and read as bytes it could never run."""
    if isinstance(value, bool):
        raise ValidationError(field_name, value, _SIZE_FORMS)
    if isinstance(value, int | float):
        number, unit, shown = _float(value, field_name, _SIZE_FORMS), "", f"{value}"
    else:
        match = _SIZE_RE.match(str(value))
        if not match:
            raise ValidationError(field_name, value, _SIZE_FORMS)
        number, unit, shown = float(match.group(1)), match.group(2).lower(), match.group(1)
    size = number * _UNITS[unit]
    if not math.isfinite(size) or size <= 0 or size > MAX_MEMORY_BYTES:
        raise ValidationError(field_name, value, "must be more than 0 and at most 64t; " + _SIZE_FORMS)
    if not unit and size < MIN_MEMORY:
        need = "Docker needs at least 6m" if field_name == "memory" else "a size under 6m needs its unit (512k)"
        hint = f"; did you mean {shown}g?" if number * GiB <= MAX_MEMORY_BYTES else ""
        raise ValidationError(field_name, value, f"a bare number is bytes, and {need}{hint}")
    return int(size)


def gb_to_bytes(gb: float) -> int:
    """Bytes of a size in GB (GiB) as the seed's records and ``-mem`` give it: ``0.25`` is 256 MiB."""
    return int(round(gb * GiB))


def parse_cpus(value: str | float | int) -> float:
    """CPU cores as ``docker run --cpus`` takes them: ``2``, ``0.5``."""
    try:
        cpus = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValidationError("cpus", value, "use a number of cores such as 2 or 0.5") from None
    if not math.isfinite(cpus) or cpus <= 0 or cpus > MAX_CPUS:
        raise ValidationError("cpus", value, f"must be more than 0 and at most {MAX_CPUS:g}, such as 2 or 0.5")
    if round(cpus * 1e9) < 1e6:
        raise ValidationError("cpus", value, "the smallest share Docker enforces is 0.001 cores")
    return cpus


def parse_gpus(value: str | float | int) -> int:
    """A whole number of GPUs, 0 to 64 (the seed's ``-gpu_cores 1.0`` is accepted when whole)."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValidationError("gpus", value, f"use a whole number of GPUs from 0 to {MAX_GPUS}") from None
    if not number.is_integer() or not 0 <= number <= MAX_GPUS:
        raise ValidationError("gpus", value, f"use a whole number of GPUs from 0 to {MAX_GPUS} (GPUs are not shared)")
    return int(number)


def parse_whole(field_name: str, value: str | float | int, low: int, high: int) -> int:
    """A whole number from ``low`` to ``high`` as typed (``3``, ``3.0``) or sent as JSON; the bounds are
    :mod:`cloudai.limits`' (``--retries``, ``--priority``)."""
    accepted = f"use a whole number from {low} to {high}"
    if isinstance(value, bool):
        raise ValidationError(field_name, value, accepted)
    try:
        number = int(value) if isinstance(value, int) else int(str(value).strip())
    except ValueError:
        try:
            whole = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ValidationError(field_name, value, accepted) from None
        if not whole.is_integer():
            raise ValidationError(field_name, value, accepted) from None
        number = int(whole)
    if not low <= number <= high:
        raise ValidationError(field_name, value, accepted)
    return number


def parse_duration(value: str | float | int | None) -> float | None:
    """Seconds from ``90``, ``30s``, ``30m``, ``2h``, ``1h30m``; ``None``/``0`` mean no limit."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = _float(value, "timeout", _DURATION_FORMS)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION_RE.findall(text)
            if not parts or _DURATION_RE.sub("", text).strip():
                raise ValidationError("timeout", value, _DURATION_FORMS) from None
            scale = {"s": 1, "m": 60, "h": 3600, "d": 86400}
            seconds = sum(float(n) * scale[u.lower()] for n, u in parts)
    if not math.isfinite(seconds) or seconds < 0 or seconds > MAX_TIMEOUT_S:
        raise ValidationError("timeout", value, f"must be from 0 (no limit) to {MAX_TIMEOUT_S / 86400:g}d; "
                              + _DURATION_FORMS)
    return seconds or None


def _float(value: int | float, field_name: str, forms: str) -> float:
    try:
        return float(value)
    except OverflowError:  # an int beyond any float (an API client can send one)
        raise ValidationError(field_name, value, forms) from None


def format_bytes(size: int | None) -> str:
    """``64 MiB``, ``4 GiB``, ``1.5 GiB``: how limits are shown back to users."""
    if size is None:
        return "-"
    for unit, scale in (("TiB", 1024**4), ("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.4g} {unit}"
    return f"{size} B"


@dataclass(frozen=True)
class Resources:
    """What a task asks for. Memory and storage are bytes; GPUs are whole devices."""

    cpus: float = 1.0
    memory: int = GiB
    gpus: int = 0
    storage: int | None = None

    @classmethod
    def parse(
        cls,
        cpus: str | float | None = None,
        memory: str | float | None = None,
        gpus: str | int | None = None,
        storage: str | float | None = None,
    ) -> Resources:
        """Resources from what a user typed; ``None`` keeps the default. Raises :class:`ValidationError`."""
        default = cls()
        mem = default.memory if memory is None else parse_size(memory, "memory")
        if mem < MIN_MEMORY:
            raise ValidationError("memory", memory, "Docker needs at least 6m; " + _SIZE_FORMS)
        return cls(
            cpus=default.cpus if cpus is None else parse_cpus(cpus),
            memory=mem,
            gpus=default.gpus if gpus is None else parse_gpus(gpus),
            storage=None if storage is None else parse_size(storage, "storage"),
        )

    def describe(self) -> str:
        text = f"{self.cpus:g} CPU, {format_bytes(self.memory)}"
        if self.gpus:
            text += f", {self.gpus} GPU"
        if self.storage:
            text += f", {format_bytes(self.storage)} disk"
        return text


class TaskStatus(str, Enum):
    """The task lifecycle (docs/architecture.md, "Task lifecycle")."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    LOST = "lost"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    def can_become(self, new: TaskStatus) -> bool:
        return new in TRANSITIONS[self]


TERMINAL = frozenset(
    {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.TIMEOUT, TaskStatus.LOST}
)
LIVE = frozenset({TaskStatus.QUEUED, TaskStatus.RUNNING})  # these hold a reservation on their worker
S = TaskStatus
TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    # pending <- queued/running: a lost task requeued as a new attempt (same id)
    S.PENDING: frozenset({S.QUEUED, S.CANCELLED, S.FAILED}),
    S.QUEUED: frozenset({S.RUNNING, S.CANCELLED, S.FAILED, S.LOST, S.PENDING}),
    S.RUNNING: frozenset({S.COMPLETED, S.FAILED, S.CANCELLED, S.TIMEOUT, S.LOST, S.PENDING}),
    **{t: frozenset() for t in TERMINAL},
}


def new_task_id() -> str:
    return uuid.uuid4().hex[:12]


def new_execution_id(attempt: int = 1) -> str:
    """A fresh attempt's identity (as rq's Execution id). It starts with the zero-padded attempt number, so
    ids of one task sort by attempt (the Redis registry never lets an older attempt replace a newer one)."""
    return f"{attempt:04d}-{uuid.uuid4().hex[:12]}"


def join_command(args: list[str] | tuple[str, ...]) -> str | None:
    """One shell command from a command line's words (``submit --shell``, the original ``task`` syntax): one
    argument is taken as written (it is the script), several are quoted and joined."""
    if not args:
        return None
    if len(args) == 1:
        return args[0]
    return shlex.join(args)


def show_command(args: list[str] | tuple[str, ...], entrypoint: str | None = None) -> str | None:
    """What a container runs as one readable line (the record's ``command``), quoted where needed: its
    arguments, after the entrypoint that replaces the image's when there is one (as ``docker ps`` shows it). A
    shell line (``--shell``: ``/bin/sh -c LINE``) is shown as written after the shell, not quoted again: it is
    what the user typed."""
    words = ([entrypoint] if entrypoint else []) + list(args)
    if len(words) >= 3 and words[-2] == "-c" and words[-3].rsplit("/", 1)[-1] in ("sh", "bash"):
        return f"{shlex.join(words[:-1])} {words[-1]}"
    return shlex.join(words) if words else None


@dataclass
class TaskError:
    type: str
    message: str


@dataclass
class Task:
    """A task record as the store keeps it: the seed's fields plus those docs/architecture.md lists."""

    task_id: str
    user_id: str
    docker_image: str
    command: str | None = None  # ``args`` as one readable line (the seed's field); ``args`` is what runs
    req_cpu: float = 1.0
    # Memory and storage are bytes, as in Resources, the queue message and the API's JSON. Records written
    # before held the seed's req_memory / req_storage in GB: upgrade_task_doc converts them when read.
    memory_bytes: int = GiB
    storage_bytes: int | None = None
    req_gpu: int = 0
    status: TaskStatus = TaskStatus.PENDING
    created_at: datetime = field(default_factory=next_created_at)
    started_at: datetime | None = None
    completed_at: datetime | None = None
    worker_id: str | None = None
    container_id: str | None = None
    exit_code: int | None = None
    oom_killed: bool = False
    error: TaskError | None = None
    gpu_ids: list[str] = field(default_factory=list)
    attempt: int = 1
    retries: int = 0
    timeout_s: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    name: str | None = None
    pinned_worker: str | None = None
    constraints: dict[str, str] = field(default_factory=dict)
    priority: int = 0
    pull_policy: str = "missing"
    read_only: bool = False  # read-only root filesystem, writable tmpfs /tmp
    pending_reason: str | None = None
    log_base: int = 0  # log lines of earlier attempts: this attempt's container output starts after them
    after: list[str] = field(default_factory=list)  # ids of tasks that must complete before this one starts
    execution_id: str = field(default_factory=new_execution_id)  # the current attempt's identity
    # the log archive: what its chunks take in the store (counted by the store as they are written), and when
    # the retention job removed it (CLOUDAI_LOG_ARCHIVE_RETENTION)
    log_bytes: int = 0
    log_removed_at: datetime | None = None
    # how the container runs, as `docker run` runs it (cloudai/runoptions.py): ``args`` replace the image's CMD
    # and go to its ENTRYPOINT, which ``entrypoint`` replaces when set ('' clears it, as docker's does)
    args: list[str] = field(default_factory=list)
    entrypoint: str | None = None
    mounts: list[str] = field(default_factory=list)  # Mount.spec texts (cloudai/volumes.py)
    shm_size: int | None = None  # bytes of /dev/shm (counted in the memory limit); None: Docker's 64 MiB
    container_user: str | None = None  # UID[:GID] or a name the container's processes run as (docker run -u)
    ipc: str | None = None  # private | shareable | none | host (host only where the operator allows it)
    ulimits: list[str] = field(default_factory=list)  # Ulimit.spec texts: nofile=1024:4096
    gpu_devices: list[str] = field(default_factory=list)  # --gpus device=ID,...: exactly these GPU ids
    # data in and results out (cloudai/outputs.py, cloudai/uploads.py): the paths copied out of the container
    # into the artifact store when it ends, and where the uploaded directory is placed before it starts
    outputs: list[str] = field(default_factory=list)
    upload: str | None = None

    @property
    def resources(self) -> Resources:
        return Resources(
            cpus=self.req_cpu,
            memory=self.memory_bytes,
            gpus=self.req_gpu,
            storage=self.storage_bytes,
        )

    def to_doc(self) -> dict[str, Any]:
        """A plain dict for the store (datetimes kept as datetimes, enums as strings): what
        ``dataclasses.asdict`` gives, built field by field (its recursive deep copy was a third of the cost of
        recording a task on every submit; the lists and dicts here hold only strings, so a shallow copy
        of each is a full one)."""
        doc: dict[str, Any] = {}
        for name in _TASK_FIELDS:
            value = getattr(self, name)
            if isinstance(value, list):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            doc[name] = value
        doc["status"] = self.status.value
        if self.error is not None:
            doc["error"] = dataclasses.asdict(self.error)
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Task:
        """A record as either store keeps it, in this release's form or an older one (:func:`upgrade_task_doc`)."""
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in upgrade_task_doc(doc).items() if k in names}
        data["status"] = TaskStatus(data["status"])
        if data.get("error"):
            data["error"] = TaskError(**data["error"])
        for key in ("created_at", "started_at", "completed_at", "log_removed_at"):
            data[key] = as_utc(data.get(key))
        return cls(**data)

    @property
    def reason(self) -> str | None:
        """Why a finished task did not complete, in a few words: ``exit 2``, ``killed: out of memory, limit
        64 MiB``, ``cancelled by alice``, ``timed out after 30s and was stopped``."""
        if self.status == TaskStatus.COMPLETED or not self.status.terminal:
            return None
        if self.status == TaskStatus.FAILED and self.exit_code is not None and not self.oom_killed:
            return f"exit {self.exit_code}"
        if self.status == TaskStatus.LOST and self.error and not self.error.message.startswith("lost"):
            return f"lost: {self.error.message}"
        return self.error.message if self.error else self.status.value

    def outcome(self) -> dict[str, Any]:
        """The CloudAI outcome of this attempt, as Celery's events carry it beside Celery's state."""
        return {"task_id": self.task_id, "attempt": self.attempt, "status": self.status.value,
                "exit_code": self.exit_code, "oom_killed": self.oom_killed, "reason": self.reason,
                "error_type": self.error.type if self.error else None, "worker_id": self.worker_id}


_TASK_FIELDS = tuple(f.name for f in dataclasses.fields(Task))


def upgrade_task_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """A task record in this release's form, the one place that knows the old forms (both stores read every task
    through :meth:`Task.from_doc`). Records written before memory was bytes end to end hold the seed's
    ``req_memory`` / ``req_storage`` in GB (floats); they become ``memory_bytes`` / ``storage_bytes`` (where a
    record has both, an old one updated since, the bytes win). Records written before ``args`` ran their
    ``command`` with ``/bin/sh -c`` in place of the image's entrypoint: a retry of one runs exactly that."""
    if "args" not in doc and doc.get("command") is not None:
        doc = {**doc, "args": ["-c", doc["command"]], "entrypoint": "/bin/sh"}
    old = {"req_memory": "memory_bytes", "req_storage": "storage_bytes"}
    if not any(key in doc for key in old):
        return doc
    doc = dict(doc)
    for key, new in old.items():
        if key in doc:
            gb = doc.pop(key)
            if new not in doc:
                doc[new] = None if gb is None else gb_to_bytes(gb)
    return doc


def as_utc(value: Any) -> datetime | None:
    """Stores hand back naive datetimes (Mongo) or ISO strings (SQLite); make them aware UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


class WorkerState(str, Enum):
    ACTIVE = "active"
    DRAINING = "draining"
    OFFLINE = "offline"


@dataclass
class WorkerInfo:
    """A registered worker host and what it offers."""

    worker_id: str
    hostname: str
    queue: str
    cpus: float
    memory: int  # bytes
    gpu_ids: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    state: WorkerState = WorkerState.ACTIVE
    last_heartbeat: datetime = field(default_factory=utcnow)
    started_at: datetime = field(default_factory=utcnow)
    slots: int = 16  # tasks it runs at once (its Celery concurrency): part of its capacity
    volumes: dict[str, str] = field(default_factory=dict)  # name -> ro|rw[,per-user]; host paths stay on the host
    pids_limit: int | None = None  # each task's pids limit here: its share of the host's PID budget
    disk_quota: bool | None = None  # whether Docker's storage driver bounds a writable layer (else a watcher)
    pressure: str | None = None  # why it takes no new task now (disk), set and cleared by the worker itself

    def to_doc(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["state"] = self.state.value
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> WorkerInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in doc.items() if k in names}
        data["state"] = WorkerState(data["state"])
        data["last_heartbeat"] = as_utc(data["last_heartbeat"])
        data["started_at"] = as_utc(data["started_at"])
        return cls(**data)

    def alive(self, now: datetime, timeout_s: float) -> bool:
        """Not offline and heard from within ``timeout_s``."""
        return self.state != WorkerState.OFFLINE and (now - self.last_heartbeat).total_seconds() <= timeout_s


@dataclass
class Assignment:
    """The seed's assignment row: which worker a task was placed on."""

    ass_id: str
    task_id: str
    worker_id: str
    assigned_at: datetime = field(default_factory=utcnow)


QUOTA_LIMITS = ("cpus", "memory", "gpus", "tasks", "waiting")


def quota_doc(user: str, quota: Quota | None, usage: dict[str, float] | None = None) -> dict[str, Any]:
    """A user's quota (and what their live tasks hold) as ``cloudai quota --json`` and the API show it."""
    doc: dict[str, Any] = {"user": user, "quota": quota.limits() if quota else dict.fromkeys(QUOTA_LIMITS)}
    if usage is not None:
        doc["used"] = usage
    return doc


@dataclass
class Quota:
    """What one user's queued and running tasks may hold at once, and how many of their tasks may wait
    (``waiting``: pending ones); admin-set, or the operator's defaults (:mod:`cloudai.quotapolicy`). ``None``
    means no limit."""

    user_id: str
    cpus: float | None = None
    memory: int | None = None  # bytes
    gpus: int | None = None
    tasks: int | None = None
    updated_at: datetime = field(default_factory=utcnow)
    waiting: int | None = None  # pending tasks (a submit past it is refused; placement never looks at it)

    def to_doc(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Quota:
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in doc.items() if k in names}
        data["updated_at"] = as_utc(data.get("updated_at")) or utcnow()
        return cls(**data)

    def limits(self) -> dict[str, float | None]:
        """The limits by name (``None``: no limit)."""
        return {name: getattr(self, name) for name in QUOTA_LIMITS}

    def exceeded_alone(self, resources: Resources) -> str | None:
        """Why a task with ``resources`` could never run under this quota (even with nothing else running)."""
        over = [
            (self.cpus is not None and resources.cpus > self.cpus + 1e-9, f"{resources.cpus:g} CPUs",
             f"{self.cpus:g}" if self.cpus is not None else ""),
            (self.memory is not None and resources.memory > self.memory, format_bytes(resources.memory),
             format_bytes(self.memory)),
            (self.gpus is not None and resources.gpus > self.gpus, f"{resources.gpus} GPUs", str(self.gpus)),
            (self.tasks is not None and self.tasks < 1, "1 task", str(self.tasks)),
        ]
        for hit, wanted, limit in over:
            if hit:
                return f"the task needs {wanted} but the quota of {self.user_id} allows {limit}"
        return None
