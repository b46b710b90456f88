"""A worker's PID budget: what the host can afford to its tasks, shared over its slots. Every thread counts
against a container's pids limit (the cgroup's pids controller counts tasks), and the host has one table of
ids (``kernel.pid_max``) and one thread limit (``kernel.threads-max``) for everyone: a fork loop in each of 16
tasks with 4,096 each would take 65,536 ids on a host with 32,768. Each task gets
``min(CLOUDAI_PIDS_LIMIT, (host - CLOUDAI_PIDS_RESERVE) / slots)``, so the sum over the worker's concurrent
tasks stays within what the host can spare and the host keeps its reserve."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

PID_MAX = Path("/proc/sys/kernel/pid_max")
THREADS_MAX = Path("/proc/sys/kernel/threads-max")
MIN_PER_TASK = 64  # below this a task can hardly start a shell pipeline; said in the worker's log


def host_limit(pid_max: Path = PID_MAX, threads_max: Path = THREADS_MAX) -> int | None:
    """The host's bound on processes and threads together; None when /proc doesn't say (not Linux)."""
    values = []
    for path in (pid_max, threads_max):
        try:
            values.append(int(path.read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            continue
    return min(values) if values else None


def per_task(setting: int, host: int | None, reserve: int, slots: int) -> int:
    """Each task's pids limit: ``setting`` (CLOUDAI_PIDS_LIMIT), lowered to this worker's share of the host's
    PIDs (``host`` less ``reserve``, over ``slots`` tasks). At least 1; ``host`` None: ``setting``."""
    if host is None:
        return max(1, setting)
    budget = max(host - max(0, reserve), 0)
    return max(1, min(setting, budget // max(1, slots)))


def worker_pids_limit(setting: int, reserve: int, slots: int) -> int:
    """:func:`per_task` for this host, said in the log."""
    host = host_limit()
    limit = per_task(setting, host, reserve, slots)
    if host is not None:
        log.info("PID budget: host allows %d, %d kept for the host (CLOUDAI_PIDS_RESERVE); %d slots get a pids "
                 "limit of %d each (CLOUDAI_PIDS_LIMIT %d)", host, reserve, slots, limit, setting)
    if limit < MIN_PER_TASK:
        log.warning("tasks get a pids limit of only %d: lower the worker's concurrency or CLOUDAI_PIDS_RESERVE",
                    limit)
    return limit
