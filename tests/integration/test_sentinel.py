"""One CLOUDAI_REDIS_URL for a Sentinel deployment (sentinel://...): redis-py's clients (the log bus, the
scheduler's state), the master's redis.asyncio pools and Celery's broker all find the primary through the
sentinels, and find the new one after the primary is killed. On real redis-server and redis-sentinel processes
on loopback; the simulated cluster (tests/cluster) does the same across hosts with running tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from cloudai import keys
from cloudai.celery_app import make_app
from cloudai.logs import LogBus
from cloudai.redisconn import async_pool, connect
from cloudai.settings import Settings
from tests.helpers import wait_for
from tests.sentinel import SentinelDeployment


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[SentinelDeployment]:
    sentinel = SentinelDeployment(tmp_path).start()
    yield sentinel
    sentinel.stop()


def _retry(what: str, fn: Any, timeout: float = 60.0) -> Any:
    """``fn()`` until Redis answers again (the failover: a few seconds of connection errors)."""
    holder: list[Any] = []

    def attempt() -> bool:
        try:
            holder.append(fn())
            return True
        except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError):
            return False

    wait_for(attempt, timeout, 0.1, what)
    return holder[-1]


async def _stream_lines(url: str, task_id: str) -> int:
    pool = async_pool(url, max_connections=4, timeout=5, decode_responses=True)
    import redis.asyncio as aioredis

    client = aioredis.Redis(connection_pool=pool)
    try:
        entries = await client.xrange(keys.log_stream(task_id))
        return sum(int(fields["n"]) for _, fields in entries)
    finally:
        await client.aclose()
        await pool.disconnect()


def test_every_client_follows_the_primary_through_a_failover(deployment: SentinelDeployment) -> None:
    url = deployment.url
    client = connect(url)
    bus = LogBus(client, url=url)
    app = make_app(Settings(redis_url=url, store_url="sqlite:///unused.db", worker_id="w-sentinel"))
    queue = keys.worker_queue("w-sentinel")
    first_primary = deployment.primary_port()

    client.set("before", "1")
    writer = bus.writer("t-sentinel")
    for n in range(1, 51):
        writer.add(f"line {n}")
    writer.flush()
    app.send_task("cloudai.nothing", args=[1], queue=queue, ignore_result=True)
    assert client.wait(1, 5000) == 1  # replicated: what the test expects to survive the failover
    assert asyncio.run(_stream_lines(url, "t-sentinel")) == 50

    assert deployment.kill_primary() == first_primary

    _retry("a write on the new primary", lambda: client.set("after", "1"))
    assert deployment.primary_port() != first_primary
    assert client.get("before") == "1"  # the replica had it
    for n in range(51, 101):
        writer.add(f"line {n}")
    writer.flush()  # retries through the failover, never writing a line twice
    assert [line.text for line in bus.history("t-sentinel")] == [f"line {n}" for n in range(1, 101)]
    assert _retry("the master's async read", lambda: asyncio.run(_stream_lines(url, "t-sentinel"))) == 100
    _retry("a Celery message", lambda: app.send_task("cloudai.nothing", args=[2], queue=queue, ignore_result=True))
    assert client.llen(queue) == 2  # kombu's Redis list, on the primary the sentinels named
