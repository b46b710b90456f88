"""Self-fencing of a worker (as Nomad's stop_after_client_disconnect): a worker that has not heartbeaten for
longer than the heartbeat timeout minus a margin must assume the cluster declared it dead and moved its tasks
on, so it stops its containers and takes no new work until it has heartbeaten again and cleaned up.

Only durations on this host's monotonic clock are measured here; whether a worker is alive is judged by beat
with Redis TIME (:mod:`cloudai.clock`)."""

from __future__ import annotations

import threading
import time


def fence_after(heartbeat_timeout_s: float, heartbeat_interval_s: float) -> float:
    """How long without a heartbeat a worker keeps its containers: the timeout minus a margin of at least one
    heartbeat interval (or a quarter of the timeout), so it stops them before beat can start a new attempt."""
    margin = max(heartbeat_interval_s, heartbeat_timeout_s / 4)
    return max(heartbeat_interval_s, heartbeat_timeout_s - margin)


def redis_timeout(heartbeat_timeout_s: float, heartbeat_interval_s: float) -> float:
    """The longest one Redis call of a worker may wait (socket and connect timeout). A worker notices that its
    fence expired between two calls, so none may wait longer than a fraction of the margin: a partition drops
    packets without a reset, and a read on a connection opened before it would otherwise wait the default 30 s
    while beat starts the task elsewhere. A supervision round makes at most about three calls (flush, its check
    after a failed write, the cancel flag): a quarter of the margin each, at least 0.5 s, at most 30 s."""
    margin = heartbeat_timeout_s - fence_after(heartbeat_timeout_s, heartbeat_interval_s)
    return max(0.5, min(30.0, margin / 4))


class Fence:
    """When this worker last heartbeat, and whether it may run containers now."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self._last_ok = time.monotonic()
        self._cleaned = threading.Event()  # set once containers of lost attempts are gone after a gap
        self._cleaned.set()
        self._lock = threading.Lock()

    def expired(self) -> bool:
        """No heartbeat for longer than the limit: this worker may already be declared dead."""
        return time.monotonic() - self._last_ok > self.limit_s

    def silent_for(self) -> float:
        return time.monotonic() - self._last_ok

    def heartbeat_ok(self) -> bool:
        """Record a successful heartbeat. Returns True when it ends a gap past the limit (a resume after
        SIGSTOP, a partition healed): the caller must clean up before new work runs (see :meth:`cleaned`)."""
        with self._lock:
            gap = self.expired()
            if gap:
                self._cleaned.clear()
            self._last_ok = time.monotonic()
            return gap

    def begin_cleanup(self) -> None:
        """New work waits until :meth:`cleaned` (a worker starting up reconciles first)."""
        self._cleaned.clear()

    def cleaned(self) -> None:
        """Containers of attempts this worker no longer owns are stopped and removed."""
        self._cleaned.set()

    def healthy(self) -> bool:
        return not self.expired() and self._cleaned.is_set()

    def wait_healthy(self, timeout_s: float) -> bool:
        """Block new work until the worker is known alive and clean (at most ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True
