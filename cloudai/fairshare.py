"""Fair share across users, after Slurm's classic factor F = 2^(-U/S): U is the user's share of the recent
usage of the whole cluster (CPU-seconds, GPUs weighted, decayed with a half-life; kept incrementally in Redis
by :mod:`cloudai.reservations`), S the user's share of the cluster (equal shares among the users that used
it or wait for it). A user who used less of their share recently has the larger factor and goes first."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from cloudai.models import Task


def factors(usage: dict[str, float], users: Iterable[str]) -> dict[str, float]:
    """The fair-share factor (0..1] of each user in ``users``."""
    everyone = set(usage) | set(users)
    total = sum(max(0.0, u) for u in usage.values())
    if not everyone or total <= 0:
        return {u: 1.0 for u in everyone}
    share = 1.0 / len(everyone)
    return {u: 2.0 ** (-(max(0.0, usage.get(u, 0.0)) / total) / share) for u in everyone}


def rank(pending: Iterable[Task], usage: dict[str, float], starved_before: datetime) -> list[Task]:
    """Waiting tasks in the order a placement pass tries them: tasks waiting since before ``starved_before``
    first (oldest first, so none waits for ever), then by the user's fair-share factor, then priority within
    the user's tasks, then submit time."""
    tasks = list(pending)
    factor = factors(usage, {t.user_id for t in tasks})

    def key(t: Task) -> tuple[int, float, int, datetime, str]:
        if t.created_at < starved_before:
            return (0, 0.0, 0, t.created_at, t.task_id)
        return (1, -factor[t.user_id], -t.priority, t.created_at, t.task_id)

    return sorted(tasks, key=key)
