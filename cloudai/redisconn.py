"""The one place a redis-py client is made from ``CLOUDAI_REDIS_URL``: the master, workers, beat and the
operator's direct-mode commands all connect here, so a URL form (TLS, a password, a Sentinel deployment) is
understood by every one of them or by none."""

from __future__ import annotations

import redis


def connect(url: str, socket_timeout: float | None = 30.0, socket_connect_timeout: float | None = 5.0) -> redis.Redis:
    """redis-py's client for ``url``: text replies, timeouts, and a health check on a connection idle for 15 s
    (a Redis restarted behind a pooled connection is noticed before a command is lost on it)."""
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=socket_timeout,
                                socket_connect_timeout=socket_connect_timeout, health_check_interval=15)
