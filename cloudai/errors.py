"""The errors users see. Each carries the exit code the CLI returns for it and a message that says
what went wrong and what to do about it."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of the ``cloudai`` command.

    ``monitor``, ``logs -f`` and ``submit -f`` exit with the container's own code (0-255) when the task
    completed or failed after its container ran; the codes below mark everything else. They follow
    the conventions of ``docker run`` (125: the container never ran) and GNU ``timeout`` (124).
    """

    OK = 0
    ERROR = 1  # any other CloudAI error (not from a container)
    USAGE = 2  # bad option or value; nothing was recorded
    LOST = 121  # the worker died or vanished while holding the task
    NOT_FOUND = 122  # unknown task or worker
    UNAVAILABLE = 123  # Redis, the store or Docker can't be reached
    TIMEOUT = 124  # the task ran past its --timeout and was stopped
    NOT_STARTED = 125  # failed before its container ran (image pull, docker error, no GPU)
    CANCELLED = 130  # cancelled by a user


class CloudAIError(Exception):
    """Base of every user-facing failure."""

    exit_code: ExitCode = ExitCode.ERROR


class ConfigError(CloudAIError):
    """A CLOUDAI_* variable or a flag has a value we can't use."""

    exit_code = ExitCode.USAGE


class ValidationError(CloudAIError):
    """A value a user typed (resources, durations, env) is not valid."""

    exit_code = ExitCode.USAGE

    def __init__(self, field: str, value: object, accepted: str) -> None:
        self.field = field
        self.value = value
        self.accepted = accepted
        try:
            shown = repr(value)
        except ValueError:  # an int too long to print
            shown = f"<{type(value).__name__}>"
        if len(shown) > 80:  # a 10 MB command is not echoed back whole
            shown = f"{shown[:60]}...' ({len(value) if isinstance(value, str | bytes) else len(shown)} characters)"
        super().__init__(f"invalid {field} {shown}: {accepted}")


class NotFoundError(CloudAIError):
    """A task or worker id that the store doesn't know."""

    exit_code = ExitCode.NOT_FOUND


class NeedsMaster(ConfigError):
    """A command that changes the cluster, run without the master: users reach the cluster through the master's
    API alone (direct mode is the operators' read-only view)."""

    def __init__(self, command: str) -> None:
        super().__init__(
            f"`cloudai {command}` goes through the CloudAI master: set CLOUDAI_API_URL (and CLOUDAI_TOKEN), or run "
            "`cloudai login URL`. Without a master only the read-only commands (monitor, logs, status, list, "
            "workers) work, for operators on the cluster network.")


class TaskNotFound(NotFoundError):
    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(f"no task {task_id!r}; `cloudai list` shows your tasks")


class ArtifactNotFound(NotFoundError):
    def __init__(self, task_id: str, path: str) -> None:
        super().__init__(f"task {task_id} has no output {path!r}; `cloudai artifacts {task_id}` lists what it stored")


class WorkerNotFound(NotFoundError):
    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        super().__init__(f"no worker {worker_id!r}; `cloudai workers` lists the registered ones")


class TaskExists(CloudAIError):
    """A task id that is already recorded."""


class PlacementError(CloudAIError):
    """The task can never run on this cluster as asked (no worker could ever fit it, or the pinned worker
    is not usable)."""

    exit_code = ExitCode.USAGE


class ServiceUnavailable(CloudAIError):
    """Redis, the store or Docker did not answer."""

    exit_code = ExitCode.UNAVAILABLE


class StoreUnavailable(ServiceUnavailable):
    def __init__(self, url: str, reason: object) -> None:
        super().__init__(f"task store at {redact(url)} can't be reached: {_short(reason)}. Check CLOUDAI_STORE_URL.")


class RedisUnavailable(ServiceUnavailable):
    def __init__(self, url: str, reason: object) -> None:
        super().__init__(f"Redis at {redact(url)} can't be reached: {_short(reason)}. Check CLOUDAI_REDIS_URL.")


class DockerUnavailable(ServiceUnavailable):
    def __init__(self, reason: object) -> None:
        super().__init__(f"the Docker engine can't be reached: {reason}. Is dockerd running (DOCKER_HOST)?")


class AttemptFenced(CloudAIError):
    """A write of an attempt that is no longer its task's current one (its worker was frozen, cut off or
    declared dead, and the task moved on): refused, so a stale attempt can't log, report or hold resources."""

    def __init__(self, task_id: str, execution_id: str, what: str) -> None:
        super().__init__(f"{what} of task {task_id} refused: attempt {execution_id} is no longer current")
        self.task_id = task_id
        self.execution_id = execution_id


class ImageError(CloudAIError):
    """The image is missing and can't (or may not) be pulled."""


class ImageNotAllowed(ImageError):
    """The worker's image allow-list (CLOUDAI_ALLOWED_IMAGES) does not match the task's image."""


class RuntimeFailure(CloudAIError):
    """Docker refused to create or start the container."""


class WorkerRefused(RuntimeFailure):
    """The worker's own operator settings refuse what the task asks of its container (a ulimit, host IPC)."""


class TaskFailed(CloudAIError):
    """A task that ended other than ``completed``, as its Celery task raises it so that Celery (and Flower) record
    ``FAILURE`` with the reason as the message. ``outcome`` is the CloudAI record's summary
    (:meth:`cloudai.models.Task.outcome`); both are the exception's args, so the event (and any JSON
    serializer) carries them and can rebuild this exception from them."""

    def __init__(self, reason: str, outcome: dict[str, object] | None = None) -> None:
        super().__init__(reason, outcome or {})
        self.reason = reason
        self.outcome = outcome or {}

    def __str__(self) -> str:
        return self.reason

    def __repr__(self) -> str:
        return f"TaskFailed({self.reason!r})"


def redact(url: str) -> str:
    """A URL with its password hidden, safe for messages and logs."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://{user}@{host}"


def _short(reason: object) -> str:
    """The gist of a driver's error (pymongo appends its whole topology description)."""
    text = str(reason).splitlines()[0] if str(reason) else type(reason).__name__
    for cut in (" (configured timeouts", ", Timeout:"):
        text = text.split(cut, 1)[0]
    return text if len(text) <= 300 else text[:297] + "..."


class AuthError(CloudAIError):
    """No usable API token: missing, unknown, revoked or expired (HTTP 401)."""

    exit_code = ExitCode.ERROR


class Forbidden(CloudAIError):
    """The token is valid but its role may not do this (HTTP 403)."""

    exit_code = ExitCode.ERROR


class TooManyRequests(CloudAIError):
    """A limit the operator set on one token, user or address was reached (HTTP 429 with ``Retry-After``):
    nothing was done; the same request succeeds after ``retry_after_s`` (or once the user holds less)."""

    exit_code = ExitCode.ERROR

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, int(retry_after_s + 0.999))  # whole seconds, rounded up, at least 1
