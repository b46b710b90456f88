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
    """Redis Stream holding a task's log history; the pub/sub channel has the same name."""
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
