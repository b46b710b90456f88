"""One clock for liveness: Redis TIME. Workers stamp heartbeats with it and beat judges them with it, so two
hosts' clocks are never compared."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import redis

from cloudai import keys
from cloudai.models import WorkerInfo


def redis_now(client: redis.Redis) -> datetime:
    """The Redis server's time, as an aware UTC datetime to the millisecond (what the store keeps)."""
    reply: Any = client.time()
    seconds, micros = int(reply[0]), int(reply[1])
    return datetime.fromtimestamp(seconds + (micros // 1000) / 1000, UTC)


def stamp_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def with_redis_heartbeats(client: redis.Redis, workers: list[WorkerInfo]) -> list[WorkerInfo]:
    """Workers with ``last_heartbeat`` the later of the store's stamp and the Redis one (both Redis TIME): a
    worker heartbeats into Redis even while the store is down, and into the store when Redis lost its keys."""
    if not workers:
        return workers
    values: Any = client.mget([keys.heartbeat(w.worker_id) for w in workers])
    for worker, value in zip(workers, values, strict=True):
        if value is not None:
            stamped = datetime.fromtimestamp(int(value) / 1000, UTC)
            if stamped > worker.last_heartbeat:
                worker.last_heartbeat = stamped
    return workers
