"""The master's placer: one background thread that runs placement steps when something asks for them. A task
that ended on a worker, a cancel, an undrain or a quota change frees capacity for *other* tasks, often other
users'; whoever did it only signals (:meth:`cloudai.scheduler.Scheduler.signal`: the dirty flag and an element
on a Redis wake list), and the bounded steps run here, never on a request's or a worker's time. The thread
blocks on the wake list (BLPOP), so a task ended on another host wakes it at once."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Placer:
    """Runs ``run_pass`` on its own thread each time it is woken: by :meth:`request`, or by ``wait`` (which
    blocks up to the given seconds and says whether a signal came; e.g. a BLPOP on the wake list). Wakes that
    come during a pass are coalesced into one more pass."""

    #: how long one ``wait`` blocks before the thread looks at its stop flag again
    WAIT_S = 1.0

    def __init__(self, run_pass: Callable[[], object], name: str = "cloudai-placer",
                 wait: Callable[[float], bool] | None = None, idle: Callable[[], object] | None = None) -> None:
        """``idle`` runs after each ``wait`` that ended without a signal (the master's periodic backfill)."""
        self._run_pass = run_pass
        self._wait = wait
        self._idle = idle
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> Placer:
        self._thread.start()
        return self

    def request(self) -> None:
        """Ask for a pass; returns at once."""
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _woken(self) -> bool:
        if self._wait is None:
            self._wake.wait()
            return True
        if self._wake.is_set():
            return True
        try:
            return self._wait(self.WAIT_S) or self._wake.is_set()
        except Exception:  # Redis away: look again after a while (beat's tick places meanwhile)
            log.warning("placer could not wait for signals", exc_info=True)
            self._stop.wait(self.WAIT_S)
            return False

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._woken():
                if self._idle is not None and not self._stop.is_set():
                    try:
                        self._idle()
                    except Exception:
                        log.exception("periodic placement pass failed")
                continue
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                self._run_pass()
            except Exception:  # a failed pass must not end the placer: beat's tick and the next wake retry
                log.exception("placement pass failed")
