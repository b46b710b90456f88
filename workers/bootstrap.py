"""Worker process lifecycle: build the executor and agent when Celery's worker is ready, stop on shutdown.
Set ``CLOUDAI_AGENT=0`` for processes that only run maintenance (``cloudai beat``)."""

from __future__ import annotations

import logging
import os
import signal
import threading

from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from cloudai import metrics
from cloudai.agent import WorkerProcess, build_worker
from cloudai.celery_app import app, dispatcher, settings

log = logging.getLogger(__name__)
_lock = threading.Lock()
_process: WorkerProcess | None = None


def agent_enabled() -> bool:
    return os.environ.get("CLOUDAI_AGENT", "1") != "0"


def current() -> WorkerProcess:
    """This process's worker wiring, built on first use."""
    global _process
    with _lock:
        if _process is None:
            _process = build_worker(settings, dispatcher(app))
        return _process


@worker_ready.connect
def _on_ready(**_: object) -> None:
    if not agent_enabled():
        return
    if settings.worker_metrics_port:
        metrics.serve(settings.worker_metrics_port)  # log lines and bytes, this worker's scheduler signals
    try:
        current().agent.start()
    except Exception:
        # a worker that can't reach its store or Docker must not sit on its queue: stop (warm shutdown)
        log.critical("worker agent could not start; shutting down", exc_info=True)
        os.kill(os.getpid(), signal.SIGTERM)


@worker_shutting_down.connect
def _on_shutting_down(**_: object) -> None:
    # don't make a shutdown wait for tasks that may run for days: their containers keep running and the
    # restarted worker re-attaches (within the heartbeat timeout, else beat declares them lost)
    if agent_enabled() and _process is not None:
        _process.executor.detach_all()


@worker_shutdown.connect
def _on_shutdown(**_: object) -> None:
    if agent_enabled() and _process is not None:
        _process.agent.stop()
