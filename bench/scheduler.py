"""Benchmark: submits per second through the real library (SQLite store, Redis reservations, the Celery message
onto each worker's Redis queue) with 50 registered workers, as the backlog of live tasks grows to 10,000.

Prints the rate of the first and the last 1,000 submits and their ratio: the last 1,000 (with 9,000 live tasks
already placed) should be within 25% of the first, which a placement that lists live tasks per submit can't
be. This machine's load varies, so a baseline runs alongside: submits into an empty cluster (its own store
and Redis database, emptied every 1,000), alternating with the measured ones every 50 submits; the flatness
is the last block's ratio to the baseline over the first block's. With several rounds the medians are shown.

    python -m bench.scheduler [--workers 50] [--tasks 10000] [--block 1000] [--rounds 1]
    python -m bench.scheduler --parts 2000     # where a submit's time goes, step by step

Uses CLOUDAI_REDIS_URL when set, else starts a private redis-server (Debian's) on a free port.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import redis

from cloudai.models import GiB, WorkerInfo


def start_redis() -> tuple[str, subprocess.Popen[bytes] | None]:
    url = os.environ.get("CLOUDAI_REDIS_URL")
    if url:
        return url, None
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed; set CLOUDAI_REDIS_URL or run ./scripts/bench-scheduler")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no"], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return url, proc


class Cluster:
    """50 registered workers (no processes behind them: messages wait on their queues), a fresh SQLite store and
    its own Redis database."""

    def __init__(self, url: str, workers: int) -> None:
        from cloudai.api import CloudAI
        from cloudai.celery_app import dispatcher, make_app
        from cloudai.settings import Settings

        redis.Redis.from_url(url).flushdb()
        self.url, self.workers = url, workers
        self.tmp = tempfile.mkdtemp(prefix="cloudai-bench-")
        settings = Settings(redis_url=url, store_url=f"sqlite:///{self.tmp}/store.db", user="bench",
                            heartbeat_timeout_s=3600.0)
        self.api = CloudAI(settings, dispatcher(make_app(settings)))
        for n in range(workers):
            wid = f"bench-{n:02d}"
            self.api.store.upsert_worker(WorkerInfo(worker_id=wid, hostname="bench", queue=f"cloudai.worker.{wid}",
                                                    cpus=64, memory=256 * GiB, slots=4096))
        self.live = 0
        self.submit(50)  # warm-up, untimed: a fresh process declares each worker's queue once

    def submit(self, n: int) -> float:
        """Seconds for ``n`` submits through the library; each must end queued and dispatched."""
        from cloudai.api import SubmitRequest
        from cloudai.models import Resources, TaskStatus

        request = SubmitRequest(image="busybox", command="true", resources=Resources.parse("0.01", "16m"))
        started = time.perf_counter()
        for _ in range(n):
            task = self.api.submit(request)
            assert task.status == TaskStatus.QUEUED, task.pending_reason
        took = time.perf_counter() - started
        self.live += n
        return took

    def check_and_close(self) -> None:
        client = redis.Redis.from_url(self.url)
        queued = sum(int(client.llen(f"cloudai.worker.bench-{n:02d}")) for n in range(self.workers))  # type: ignore[arg-type]
        assert queued == self.live, f"{queued} messages on the workers' queues, expected {self.live}"
        self.api.store.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def one_round(url: str, workers: int, tasks: int, block: int, step: int = 50) -> tuple[list[float], list[float]]:
    """Submits per second of each block of ``block`` submits into the growing cluster, and of the baseline
    (an empty cluster, emptied again every ``block`` submits) over the same stretch of time: the two alternate
    every ``step`` submits, so both see the same load of this (shared) machine."""
    grow_url, base_url = url, url.rsplit("/", 1)[0] + "/1"
    grow, base = Cluster(grow_url, workers), Cluster(base_url, workers)
    grow_rates, base_rates = [], []
    for _ in range(tasks // block):
        grow_s = base_s = 0.0
        for i in range(block // step):
            if i % 2:
                grow_s += grow.submit(step)
                base_s += base.submit(step)
            else:
                base_s += base.submit(step)
                grow_s += grow.submit(step)
        grow_rates.append(block / grow_s)
        base_rates.append(block / base_s)
        base.check_and_close()
        base = Cluster(base_url, workers)
    grow.check_and_close()
    base.check_and_close()
    return grow_rates, base_rates


def parts(url: str, workers: int, n: int) -> None:
    """Where a submit's time goes: ``n`` submits into an empty cluster, timing each step of the library's
    submit path (wall time, so waits on Redis and SQLite count)."""
    import collections
    import functools

    spent: dict[str, float] = collections.defaultdict(float)

    def timed(owner: Any, name: str, label: str) -> None:
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - started

        setattr(owner, name, wrapper)

    cluster = Cluster(url, workers)
    api, scheduler = cluster.api, cluster.api.scheduler
    for owner, name, label in [
        (scheduler, "dispatch", "dispatch: the Celery message + task-sent event, one pipelined round trip"),
        (scheduler.reservations, "place", "placement script (Lua)"),
        (api.store, "create_task", "store: insert the task (alone)"),
        (api.store, "create_assignment", "store: insert the assignment (alone)"),
        (api.store, "create_assigned", "store: insert the task and its assignment (one transaction)"),
        (api.store, "list_workers", "store: list workers"),
        (api.store, "workers_version", "store: workers version (list only when changed)"),
        (api.store, "get_quota", "store: the user's quota"),
        (scheduler, "_candidates", "candidate workers"),
        (api, "ping_redis", "Redis check"),
        (api.store, "ping", "store check"),
        (api, "build_task", "validate and build the task"),
    ]:
        timed(owner, name, label)
    took = cluster.submit(n)
    print(f"{n} submits into {workers} empty workers: {n / took:.0f}/s, {took / n * 1e6:.0f} us each")
    for label, seconds in sorted(spent.items(), key=lambda item: -item[1]):
        print(f"  {seconds / n * 1e6:6.0f} us  {label}")
    print(f"  {(took - sum(spent.values())) / n * 1e6:6.0f} us  the rest")
    cluster.check_and_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--block", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--parts", type=int, metavar="N", help="instead: time each step of N submits")
    args = parser.parse_args(argv)
    url, proc = start_redis()
    os.environ["CLOUDAI_REDIS_URL"] = url  # the Celery app reads it when imported
    if args.parts:
        try:
            parts(url, args.workers, args.parts)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)
        return 0
    try:
        runs = [one_round(url, args.workers, args.tasks, args.block) for _ in range(args.rounds)]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    n = len(runs[0][0])
    grow: list[Any] = [statistics.median(r[0][i] for r in runs) for i in range(n)]
    base: list[Any] = [statistics.median(r[1][i] for r in runs) for i in range(n)]
    total = args.tasks / sum(args.block / g for g in grow)
    first, last = grow[0], grow[-1]
    flat = (last / base[-1]) / (first / base[0])
    print(f"{args.workers} workers, {args.tasks} submits (all queued and dispatched), {args.rounds} round(s)")
    print(f"submits/s per block of {args.block}, growing backlog:", " ".join(f"{g:.0f}" for g in grow))
    print(f"submits/s per block of {args.block}, empty baseline: ", " ".join(f"{b:.0f}" for b in base))
    print(f"first {args.block}: {first:.0f}/s   last {args.block} (with {args.tasks - args.block + 50} live tasks): "
          f"{last:.0f}/s   last/first = {last / first:.2f}   overall {total:.0f}/s")
    print(f"against the empty baseline measured alongside: first {first / base[0]:.2f}, last {last / base[-1]:.2f}"
          f"   -> flatness {flat:.2f} (1.00 = no cost from the backlog)")
    rate_ok, flat_ok = total >= 500, flat >= 0.75
    print(f"targets: >= 500 submits/s overall: {'met' if rate_ok else 'NOT met'};  last {args.block} within 25% "
          f"of the first (against the baseline): {'met' if flat_ok else 'NOT met'}")
    return 0 if rate_ok and flat_ok else 1


if __name__ == "__main__":
    sys.exit(main())
