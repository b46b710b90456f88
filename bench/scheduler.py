"""Benchmark: submits per second through the real library (SQLite store, Redis reservations, Celery dispatch
onto each worker's Redis queue) with 50 registered workers, as the backlog of live tasks grows to 10,000.

The baseline is the same run's first 1,000 submits: the last 1,000 (with 9,000 live tasks already placed)
should be within 25% of it, which a placement that lists live tasks per submit can't be. Each round starts on
an empty store and Redis database; with several rounds the medians are printed.

    python -m bench.scheduler [--workers 50] [--tasks 10000] [--block 1000] [--rounds 1]

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


def one_round(url: str, workers: int, tasks: int, block: int) -> list[float]:
    """Submits per second of each block of ``block`` submits."""
    from cloudai.api import CloudAI, SubmitRequest
    from cloudai.celery_app import Dispatcher
    from cloudai.models import Resources, TaskStatus
    from cloudai.settings import Settings

    redis.Redis.from_url(url).flushdb()
    tmp = tempfile.mkdtemp(prefix="cloudai-bench-")
    settings = Settings(redis_url=url, store_url=f"sqlite:///{tmp}/store.db", user="bench",
                        heartbeat_timeout_s=3600.0)
    api = CloudAI(settings, dispatch=Dispatcher(url))
    for n in range(workers):
        wid = f"bench-{n:02d}"
        api.store.upsert_worker(WorkerInfo(worker_id=wid, hostname="bench", queue=f"cloudai.worker.{wid}",
                                           cpus=64, memory=256 * GiB, slots=4096))
    request = SubmitRequest(image="busybox", command="true", resources=Resources.parse("0.01", "16m"))
    rates = []
    for _ in range(tasks // block):
        started = time.perf_counter()
        for _ in range(block):
            task = api.submit(request)
            assert task.status == TaskStatus.QUEUED, task.pending_reason
        rates.append(block / (time.perf_counter() - started))
    client = redis.Redis.from_url(url)
    queued = sum(int(client.llen(f"cloudai.worker.bench-{n:02d}")) for n in range(workers))  # type: ignore[arg-type]
    assert queued == tasks, f"{queued} messages on the workers' queues, expected {tasks}"
    api.store.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--block", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    url, proc = start_redis()
    os.environ["CLOUDAI_REDIS_URL"] = url  # the Celery app reads it when imported
    try:
        runs: list[list[float]] = [one_round(url, args.workers, args.tasks, args.block)
                                   for _ in range(args.rounds)]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    blocks: list[Any] = [statistics.median(r[i] for r in runs) for i in range(len(runs[0]))]
    first, last = blocks[0], blocks[-1]
    total = args.tasks / sum(args.block / b for b in blocks)
    print(f"{args.workers} workers, {args.tasks} submits (all queued and dispatched), {args.rounds} round(s)")
    print("submits/s per block of", args.block, ":", " ".join(f"{b:.0f}" for b in blocks))
    print(f"first {args.block}: {first:.0f}/s   last {args.block} (with {args.tasks - args.block} live tasks): "
          f"{last:.0f}/s   last/first = {last / first:.2f}   overall {total:.0f}/s")
    ok = total >= 500 and last >= 0.75 * first
    print("target (>= 500/s overall, last within 25% of first):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
