"""The master's placer: one background thread that runs placement passes when a request asks for one. A cancel,
an undrain or a quota change frees capacity for *other* tasks, often other users'; the request that did it only
signals, and the pass (which reads every waiting task) runs here, never on the request's time."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Placer:
    """Runs ``run_pass`` on its own thread each time it is woken; wakes that come during a pass are coalesced
    into one more pass (the pass itself also reruns while the scheduler's dirty flag is set)."""

    def __init__(self, run_pass: Callable[[], object], name: str = "cloudai-placer") -> None:
        self._run_pass = run_pass
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> Placer:
        self._thread.start()
        return self

    def request(self) -> None:
        """Ask for a pass; returns at once."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                self._run_pass()
            except Exception:  # a failed pass must not end the placer: beat's tick and the next wake retry
                log.exception("placement pass failed")
