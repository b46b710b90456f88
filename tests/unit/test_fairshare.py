"""The fair-share factor and the order of waiting tasks (pure functions)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cloudai.fairshare import factors, rank
from cloudai.models import Task

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _task(n: int, user: str, priority: int = 0, age_s: float = 0) -> Task:
    return Task(task_id=f"t{n}", user_id=user, docker_image="busybox", priority=priority,
                created_at=T0 + timedelta(seconds=n) - timedelta(seconds=age_s))


def test_factor_is_two_to_the_minus_usage_over_share() -> None:
    got = factors({"a": 300.0, "b": 100.0}, ["a", "b", "c"])
    # shares are 1/3 each; a used 3/4 of all usage: 2^(-0.75 * 3)
    assert abs(got["a"] - 2 ** -2.25) < 1e-12 and abs(got["b"] - 2 ** -0.75) < 1e-12 and got["c"] == 1.0
    assert factors({}, ["a"]) == {"a": 1.0}


def test_lighter_user_first_priority_within_a_user_starved_tasks_before_all() -> None:
    tasks = [_task(1, "heavy"), _task(2, "heavy", priority=9), _task(3, "light"), _task(4, "light", priority=1)]
    order = [t.task_id for t in rank(tasks, {"heavy": 50.0, "light": 1.0}, T0 - timedelta(hours=1))]
    assert order == ["t4", "t3", "t2", "t1"]
    old = _task(5, "heavy", age_s=7200)
    assert rank([*tasks, old], {"heavy": 50.0}, T0 - timedelta(hours=1))[0] is old
