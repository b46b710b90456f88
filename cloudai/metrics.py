"""Prometheus metrics of the control plane and the workers (``GET /metrics`` on the master; a worker's own
endpoint on ``CLOUDAI_WORKER_METRICS_PORT``). One registry per process: prometheus_client's default, so what
the scheduler, the API and the log writer count here is what the endpoint serves."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from cloudai.models import Task

#: one placement step (event-driven or full backfill), seconds
STEP_SECONDS = Histogram("cloudai_sched_step_seconds", "Duration of one bounded placement step", ["mode"],
                         buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
STEP_MAX = Gauge("cloudai_sched_step_max_seconds", "The longest placement step since this process started",
                 ["mode"])
#: how long a task waited in ``pending`` before a pass queued it
PLACEMENT_WAIT = Histogram("cloudai_sched_placement_wait_seconds",
                           "Time from submit to queued of tasks placed by a placement pass",
                           buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 1800, 3600))
WAITING = Gauge("cloudai_tasks_waiting", "Waiting tasks by pending reason, as of the last full pass", ["reason"])
SUBMITS = Counter("cloudai_submits", "Tasks submitted, by the status they were recorded with", ["status"])
LOG_LINES = Counter("cloudai_log_lines", "Log lines written to the log bus")
LOG_BYTES = Counter("cloudai_log_bytes", "Log bytes written to the log bus")
DRIFT = Gauge("cloudai_reservations_drift", "What beat's reconcile found the scheduler's Redis state to differ "
              "from the store by, per kind (released: records of tasks no longer live; adopted: live tasks "
              "without a record)", ["kind"])

#: the kinds of pending reason (the reason's own text would be one series per task)
REASON_KINDS = (
    ("quota:", "quota"),
    ("waiting for ", "dependency"),
    ("waiting behind", "backfill"),
    ("no active worker", "no_worker"),
    ("worker ", "worker"),
    ("every worker", "slots"),
    ("retry", "retry"),
)


def reason_kind(reason: str | None) -> str:
    """The metric label of a pending reason: ``quota``, ``dependency``, ``no_fit``, ..."""
    text = reason or ""
    for prefix, kind in REASON_KINDS:
        if text.startswith(prefix):
            return kind
    return "no_fit" if text else "unknown"


def observe_waiting(tasks: Iterable[Task]) -> None:
    """Set the waiting-tasks gauge from the tasks a full pass read (every kind seen before is reset)."""
    counts = Tally(reason_kind(t.pending_reason) for t in tasks)
    for _, kind in (*REASON_KINDS, ("", "no_fit"), ("", "unknown")):
        WAITING.labels(kind).set(counts.get(kind, 0))


_longest: dict[str, float] = {}


def observe_step(mode: str, seconds: float) -> None:
    """One placement step's duration: the histogram, and the longest so far."""
    STEP_SECONDS.labels(mode).observe(seconds)
    if seconds > _longest.get(mode, 0.0):
        _longest[mode] = seconds
        STEP_MAX.labels(mode).set(seconds)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Serve this process's metrics on ``port`` (a worker's endpoint; prometheus_client's own thread)."""
    start_http_server(port, addr)


__all__ = ["STEP_SECONDS", "PLACEMENT_WAIT", "WAITING", "SUBMITS", "LOG_LINES", "LOG_BYTES", "DRIFT",
           "STEP_MAX", "reason_kind", "observe_waiting", "observe_step", "serve"]
