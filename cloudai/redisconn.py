"""The one place a redis-py client is made from ``CLOUDAI_REDIS_URL``: the master, workers, beat and the
operator's direct-mode commands all connect here, so a URL form (TLS, a password, a Sentinel deployment) is
understood by every one of them or by none. The forms: :mod:`cloudai.redisurl`.

With a Sentinel deployment each new connection asks the sentinels where the primary is, and a connection to a
node that is no longer the primary is dropped (redis-py's ``SentinelManagedConnection``): after a failover a
command fails once with a connection error, as after a Redis restart, and the caller's retry reaches the new
primary."""

from __future__ import annotations

from typing import Any

import redis
import redis.sentinel

from cloudai.redisurl import SENTINEL_SOCKET_TIMEOUT_S, SentinelTarget, check, parse_sentinel

HEALTH_CHECK_S = 15


def _sentinel_kwargs(bound: float | None = None) -> dict[str, Any]:
    """The sentinels' timeouts: short (they answer at once or are away), and never longer than ``bound`` (the
    caller's own timeout: a worker's is a fraction of its fencing margin)."""
    timeout = SENTINEL_SOCKET_TIMEOUT_S if bound is None else min(bound, SENTINEL_SOCKET_TIMEOUT_S)
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout}


def _node_kwargs(target: SentinelTarget) -> dict[str, Any]:
    return {"db": target.db, "username": target.username, "password": target.password}


def connect(url: str, socket_timeout: float | None = 30.0, socket_connect_timeout: float | None = 5.0) -> redis.Redis:
    """redis-py's client for ``url``: text replies, timeouts, and a health check on a connection idle for 15 s
    (a Redis restarted behind a pooled connection is noticed before a command is lost on it)."""
    common: dict[str, Any] = {"decode_responses": True, "socket_timeout": socket_timeout,
                              "socket_connect_timeout": socket_connect_timeout,
                              "health_check_interval": HEALTH_CHECK_S}
    target = parse_sentinel(check(url))
    if target is None:
        return redis.Redis.from_url(url, **common)
    sentinels = list(target.sentinels)
    sentinel = redis.sentinel.Sentinel(sentinels, sentinel_kwargs=_sentinel_kwargs(socket_connect_timeout))
    return sentinel.master_for(target.service, **_node_kwargs(target), **common)


def async_pool(url: str, max_connections: int, timeout: float, **kwargs: Any) -> Any:
    """A ``redis.asyncio`` connection pool for ``url`` of at most ``max_connections``, waiting up to ``timeout``
    for a free one instead of failing (``BlockingConnectionPool``): the master's log readers
    (:mod:`cloudai.server.fanout`). ``kwargs`` go to every connection. redis.asyncio is imported here, not by the
    workers and commands that never use it."""
    import redis.asyncio as aioredis
    import redis.asyncio.sentinel as aiosentinel

    target = parse_sentinel(check(url))
    if target is None:
        return aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=timeout,
                                                        **kwargs)

    class BlockingSentinelPool(aiosentinel.SentinelConnectionPool, aioredis.BlockingConnectionPool):
        """The Sentinel pool (it asks the sentinels where the primary is) that waits for a free connection as
        ``BlockingConnectionPool`` does."""

    sentinel = aiosentinel.Sentinel(list(target.sentinels), sentinel_kwargs=_sentinel_kwargs())
    return BlockingSentinelPool(target.service, sentinel, is_master=True, max_connections=max_connections,
                                timeout=timeout, **_node_kwargs(target), **kwargs)
