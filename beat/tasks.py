"""Maintenance tasks beat schedules on the ``cloudai.maintenance`` queue."""

from __future__ import annotations

import threading

from cloudai.celery_app import app, dispatch, settings
from cloudai.logs import LogBus
from cloudai.maintenance import Maintenance
from cloudai.scheduler import Scheduler
from cloudai.store import open_store

_lock = threading.Lock()
_maintenance: Maintenance | None = None


def maintenance() -> Maintenance:
    global _maintenance
    with _lock:
        if _maintenance is None:
            store = open_store(settings.store_url)
            bus = LogBus.from_url(settings.redis_url, settings.log_stream_maxlen)
            _maintenance = Maintenance(settings, store, bus, Scheduler(settings, store, bus.redis, dispatch))
        return _maintenance


@app.task(name="cloudai.maintenance.reap", ignore_result=True)
def reap() -> dict[str, list[str]]:
    """Dead workers go offline; their tasks become lost or are retried."""
    return maintenance().reap()


@app.task(name="cloudai.maintenance.place_pending", ignore_result=True)
def place_pending() -> list[str]:
    """Queue pending tasks that fit now."""
    return maintenance().place_pending()


@app.task(name="cloudai.maintenance.reconcile", ignore_result=True)
def reconcile() -> dict[str, int]:
    """Rebuild the scheduler's reservations in Redis from the store."""
    return maintenance().reconcile_reservations()


@app.task(name="cloudai.maintenance.redispatch", ignore_result=True)
def redispatch() -> list[str]:
    """Send again the messages of queued tasks that their worker's queue lost."""
    return maintenance().redispatch_lost_messages()


@app.task(name="cloudai.maintenance.expire_logs", ignore_result=True)
def expire_logs() -> list[str]:
    """Expire finished tasks' log streams after the retention period."""
    return maintenance().expire_logs()
