"""Every Redis key, channel and queue name CloudAI uses, in one place."""

QUEUE_PREFIX = "cloudai.worker."
MAINTENANCE_QUEUE = "cloudai.maintenance"
RUN_CONTAINER_TASK = "cloudai.run_container"

LABEL_TASK_ID = "cloudai.task_id"
LABEL_WORKER_ID = "cloudai.worker_id"


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
    """Which task holds GPU ``gpu_id`` on ``worker_id`` (worker-side guard against sharing)."""
    return f"cloudai:gpu:{worker_id}:{gpu_id}"


def lock(name: str) -> str:
    """A cluster-wide lock (placement, maintenance jobs)."""
    return f"cloudai:lock:{name}"
