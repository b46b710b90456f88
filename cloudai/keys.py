"""Every Redis key, channel and queue name CloudAI uses, in one place."""

QUEUE_PREFIX = "cloudai.worker."
MAINTENANCE_QUEUE = "cloudai.maintenance"
RUN_CONTAINER_TASK = "cloudai.run_container"

LABEL_TASK_ID = "cloudai.task_id"
LABEL_WORKER_ID = "cloudai.worker_id"
LABEL_EXECUTION_ID = "cloudai.execution_id"


def worker_queue(worker_id: str) -> str:
    """The Celery queue that only worker ``worker_id`` consumes."""
    return f"{QUEUE_PREFIX}{worker_id}"


def log_stream(task_id: str) -> str:
    """Redis Stream holding a task's log: its history and its live tail."""
    return f"cloudai:logs:{task_id}"


def cancel_flag(task_id: str) -> str:
    """Set by ``cancel`` for a running task; the worker holding it polls for it."""
    return f"cloudai:cancel:{task_id}"


def gpu_lease(worker_id: str, gpu_id: str) -> str:
    """Which attempt (``<task_id>/<execution_id>``) holds GPU ``gpu_id`` on ``worker_id``, with a TTL that
    the holder's heartbeat refreshes; kept until its container is known gone."""
    return f"cloudai:gpu:{worker_id}:{gpu_id}"


def lock(name: str) -> str:
    """A cluster-wide lock (placement, maintenance jobs)."""
    return f"cloudai:lock:{name}"


def execution(task_id: str) -> str:
    """The task's current attempt (its execution id), with a TTL: every write of a run (log lines, end marker)
    is made only while this holds the writer's execution id."""
    return f"cloudai:exec:{task_id}"


def heartbeat(worker_id: str) -> str:
    """Worker ``worker_id``'s last heartbeat, stamped with Redis TIME (milliseconds), with a TTL."""
    return f"cloudai:heartbeat:{worker_id}"


# -- scheduler state (cloudai/reservations.py). The Lua scripts get SCHED_PREFIX and build the same names.
SCHED_PREFIX = "cloudai:sched:"


SCHED_FREE = f"{SCHED_PREFIX}free"
"""Hash: worker id -> ``cpu|mem|slots|capc|capm|caps|capg|sig``: free milli-CPUs, bytes and slots, the capacity
(CPUs, memory, slots, number of GPUs) and the signature of the capacity they were computed from."""


def sched_gpus(worker_id: str) -> str:
    """Set: a worker's free GPU ids."""
    return f"{SCHED_PREFIX}gpus:{worker_id}"


def sched_claim(worker_id: str) -> str:
    """Hash: the waiting task that holds a claim on a worker's resources (backfill), and how much."""
    return f"{SCHED_PREFIX}claim:{worker_id}"


def sched_reservation(task_id: str) -> str:
    """Hash: what a queued/running task holds (worker, cpu, mem, gpus, user, attempt, at)."""
    return f"{SCHED_PREFIX}res:{task_id}"


def sched_worker_tasks(worker_id: str) -> str:
    """Set: ids of the tasks holding a reservation on a worker."""
    return f"{SCHED_PREFIX}wres:{worker_id}"


def sched_user(user_id: str) -> str:
    """Hash: what a user's reservations hold now (``cpu`` milli-CPUs, ``mem``, ``gpus``, ``tasks``)."""
    return f"{SCHED_PREFIX}user:{user_id}"


def sched_user_tasks(user_id: str) -> str:
    """Set: ids of the tasks holding a reservation for a user."""
    return f"{SCHED_PREFIX}ures:{user_id}"


SCHED_USAGE = f"{SCHED_PREFIX}usage"  # hash user -> fair-share usage (CPU-seconds, decayed), as of SCHED_USAGE_AT
SCHED_USAGE_AT = f"{SCHED_PREFIX}usage_at"  # hash user -> Redis time of the last update of its usage
SCHED_CLAIMED = f"{SCHED_PREFIX}claimed"  # set: workers that have a claim (a placement reads only those)
SCHED_CLAIM_GEN = f"{SCHED_PREFIX}claimgen"  # counter: one generation of claims per placement pass
SCHED_PASS_DIRTY = f"{SCHED_PREFIX}dirty"  # set when a placement pass is asked for while one runs
SCHED_QUOTA_DEFAULTS = f"{SCHED_PREFIX}quota_defaults"  # the master's default quotas (JSON), for every pass
