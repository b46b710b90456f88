"""Per-client limits the master enforces in its own memory (one master process answers a cluster's users; a
restart forgets them, which only ever lets a client in sooner):

- :class:`RateLimit`: a token bucket per API token, one for reads and one for writes, so one user's script can't
  take the master's time from everyone (429 and ``Retry-After`` past it);
- :class:`SignInGuard`: failed sign-ins (a bad token on ``/login`` or in ``Authorization: Bearer``) per client
  address; past ``limit`` failures within ``window_s`` the address gets 429 for every token it presents, a
  right one included (else the answers would still tell a guesser when it hit), until the window has passed.
  Each failure is a log line ``sign-in failed from ADDR`` and is counted for ``GET /v1/admin/sign-in-failures``.

Both bound their own memory: a key idle long enough to be back at its start is forgotten, and past
:data:`MAX_KEYS` the least recently seen go first."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from typing import Any

from cloudai.errors import TooManyRequests

log = logging.getLogger("cloudai.server.security")

MAX_KEYS = 100_000  # tokens or addresses remembered at once (a few MB)


class RateLimit:
    """A token bucket per key: ``burst`` requests at once, refilled at ``rate`` a second (0: no limit)."""

    def __init__(self, rate: float, burst: int, what: str) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.what = what
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self._lock = threading.Lock()  # sync routes' dependencies run on the thread pool

    def take(self, key: str, now: float | None = None) -> None:
        """Spend one request of ``key``'s bucket, or :class:`TooManyRequests` saying when the next one fits."""
        if self.rate <= 0:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, at = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                raise TooManyRequests(
                    f"too many {self.what} with this token: at most {self.rate:g} a second (bursts of {self.burst}) "
                    "on this server; slow down and retry after the time in Retry-After",
                    (1.0 - tokens) / self.rate)
            self._buckets[key] = (tokens - 1.0, now)
            while len(self._buckets) > MAX_KEYS:
                self._buckets.popitem(last=False)


class SignInGuard:
    """Failed sign-ins per client address: at most ``limit`` within ``window_s`` (``limit`` 0: no limit)."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self.total = 0
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, address: str, now: float | None = None) -> None:
        """:class:`TooManyRequests` while ``address`` is over its limit; else nothing."""
        if self.limit <= 0:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            recent = self._failures.get(address)
            if recent is None or len(recent) < self.limit:
                return
            wait = recent[0] + self.window_s - now
        if wait > 0:
            raise TooManyRequests(
                f"too many failed sign-ins from {address}: {self.limit} within {self.window_s:g} s; wait, then "
                "sign in with the token an admin created for you", wait)

    def failed(self, address: str, how: str, reason: str, now: float | None = None) -> None:
        """Record one failure (``how``: ``login`` or ``bearer``) and log it for the operator."""
        now = time.monotonic() if now is None else now
        log.warning("sign-in failed from %s (%s): %s", address, how, reason)
        with self._lock:
            self.total += 1
            if self.limit <= 0:
                return
            recent = self._failures.pop(address, None)
            if recent is None:
                recent = deque(maxlen=self.limit)
            while recent and recent[0] <= now - self.window_s:
                recent.popleft()
            recent.append(now)
            self._failures[address] = recent
            while len(self._failures) > MAX_KEYS:
                self._failures.popitem(last=False)

    def report(self, now: float | None = None) -> dict[str, Any]:
        """What an admin sees: the failures counted since the start, and the addresses with recent ones."""
        now = time.monotonic() if now is None else now
        with self._lock:
            rows = []
            for address, recent in self._failures.items():
                fresh = [t for t in recent if t > now - self.window_s]
                if fresh:
                    throttled = len(recent) >= self.limit and recent[0] + self.window_s > now
                    rows.append({"address": address, "recent_failures": len(fresh),
                                 "last_s_ago": round(now - fresh[-1], 1),
                                 "throttled_for_s": round(recent[0] + self.window_s - now, 1) if throttled else 0})
            return {"total": self.total, "window_s": self.window_s, "limit": self.limit, "addresses": rows}
