"""The master's per-client limits and the live-log feed's ring, without services (the e2e tests in
tests/e2e/test_shared_limits_master.py drive them through a real server)."""

from __future__ import annotations

import asyncio
import gc

import pytest

from cloudai.errors import ConfigError, TooManyRequests
from cloudai.server.errors import public_message
from cloudai.server.fanout import RING_ENTRIES, FollowerCap, TaskFeed, entry_key
from cloudai.server.throttle import RateLimit, SignInGuard
from cloudai.settings import Settings


def test_a_token_bucket_allows_its_burst_then_says_when_the_next_request_fits() -> None:
    limit = RateLimit(rate=2, burst=3, what="reads")
    for _ in range(3):
        limit.take("a", now=100.0)
    with pytest.raises(TooManyRequests) as refused:
        limit.take("a", now=100.0)
    assert refused.value.retry_after_s == 1 and "at most 2 a second" in str(refused.value)
    limit.take("b", now=100.0)  # another token has its own bucket
    limit.take("a", now=100.5)  # half a second refills one request
    RateLimit(rate=0, burst=1, what="reads").take("a")  # rate 0: no limit


def test_failed_sign_ins_throttle_an_address_for_the_rest_of_the_window() -> None:
    guard = SignInGuard(limit=3, window_s=60)
    for t in (0.0, 10.0, 20.0):
        guard.check("10.0.0.1", now=t)
        guard.failed("10.0.0.1", "bearer", "unknown API token", now=t)
    with pytest.raises(TooManyRequests) as refused:
        guard.check("10.0.0.1", now=30.0)
    assert refused.value.retry_after_s == 30  # until the first failure leaves the window
    guard.check("10.0.0.2", now=30.0)
    guard.check("10.0.0.1", now=60.5)  # the window has passed
    report = guard.report(now=30.0)
    assert report["total"] == 3 and report["addresses"][0]["throttled_for_s"] == 30.0


def test_follower_leases_are_capped_per_user_and_given_back_once_even_when_dropped() -> None:
    cap = FollowerCap(2)
    first, _second = cap.acquire("ana"), cap.acquire("ana")
    with pytest.raises(TooManyRequests, match="CLOUDAI_FOLLOWERS_PER_USER=2"):
        cap.acquire("ana")
    cap.acquire("bo")
    first.release()
    first.release()
    assert cap.held["ana"] == 1
    del _second  # a response that never started: its lease goes with it
    gc.collect()
    assert "ana" not in cap.held


def test_the_feed_ring_is_bounded_and_says_when_a_follower_must_read_redis() -> None:
    async def scenario() -> None:
        feed = TaskFeed("t1")
        assert feed.after("0-0") is None  # not started: the follower reads Redis itself
        feed.base = entry_key("0-0")
        assert feed.after("0-0") == []  # at the tail: wait
        woken = feed.changed
        feed.add([(f"{seq}-0", {"n": "1", "l": "[\"x\"]", "t": "[\"\"]"}) for seq in range(1, RING_ENTRIES + 101)])
        assert woken.is_set() and not feed.changed.is_set()
        assert len(feed.entries) == RING_ENTRIES and feed.base == (100, 0)
        assert feed.after("50-0") is None  # the ring moved past it
        got = feed.after("100-0")
        assert got is not None and [e[0] for e in got[:2]] == ["101-0", "102-0"] and len(got) == 50
        assert feed.after(f"{RING_ENTRIES + 100}-0") == []

    asyncio.run(scenario())


def test_a_service_outage_is_named_by_its_kind_and_addresses_are_cut() -> None:
    from cloudai.errors import CloudAIError, RedisUnavailable, StoreUnavailable

    assert "redis://" not in public_message(RedisUnavailable("redis://:pw@redis-host:6379/0", "refused"))
    store = public_message(StoreUnavailable("mongodb://u:pw@mongo-host/db", "timeout"))
    assert "mongo-host" not in store and "task store" in store
    assert public_message(CloudAIError("lost redis://10.0.0.5:6379/0, retry")) == "lost <address hidden>, retry"


@pytest.mark.parametrize("name", ["CLOUDAI_SESSION_TTL", "CLOUDAI_SERVER_HEADER_TIMEOUT"])
def test_a_zero_duration_is_refused_naming_the_variable(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: "0"})


def test_limit_settings_from_the_environment() -> None:
    s = Settings.from_env({"CLOUDAI_FOLLOWERS_PER_USER": "5", "CLOUDAI_API_READ_RATE": "0.5",
                           "CLOUDAI_SIGNIN_FAILURES": "3", "CLOUDAI_SERVER_MAX_CONNECTIONS": "64"})
    assert (s.followers_per_user, s.api_read_rate, s.signin_failures, s.server_max_connections) == (5, 0.5, 3, 64)
    assert Settings.from_env({}).session_ttl_s == 12 * 3600
