"""Benchmark: a fleet of simulated workers (registered and heartbeating into Redis and the store, as agents do;
no consumers: messages wait on their queues) and a growing history of tasks of mixed shapes. Prints:

- submits/s through the library (one process) and through a real `cloudai server` with 16 HTTP clients,
  the first 10% of each against the last 10%;
- how long a freed slot waits for its next task with a deep backlog: a task "ends" as a worker ends it (the
  store's outcome, its reservation released, a signal), and the clock stops when the next task's message lands
  on that worker's queue, placed by the master's placer (p50, p99, max);
- the longest scheduling step the master took (its /metrics);
- `list` of the newest 100 at the final size, from the store and through the master (GET /v1/tasks);
- Redis memory and store size per task.

    python -m bench.fleet                       # ~1-2 minutes: 1,000 workers, a few thousand tasks
    python -m bench.fleet --tasks 100000 --master-tasks 20000 --backlog 50000

Uses CLOUDAI_REDIS_URL when set (its database is emptied), else a private redis-server.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import redis

from bench.api import free_port, start_server
from bench.scheduler import start_redis
from cloudai import keys
from cloudai.clock import redis_now, stamp_ms
from cloudai.models import GiB, Resources, TaskStatus, WorkerInfo
from cloudai.settings import Settings

S = TaskStatus
STEP_MAX_EVENT = 'cloudai_sched_step_max_seconds{mode="event"}'
LAT_WORKERS = 10  # the latency probe's own workers (label pool=lat, one slot each)
SHAPES: list[tuple[str, str, dict[str, str]]] = [  # cpus, memory, labels
    ("0.1", "64m", {}), ("0.5", "256m", {}), ("1", "1g", {}), ("2", "2g", {}), ("0.25", "128m", {"zone": "a"}),
    ("1", "512m", {"zone": "b"}),
]


def rates(samples: list[float]) -> tuple[float, float]:
    """Submits/s of the first and the last 10% of ``samples`` (each one submit's seconds)."""
    tenth = max(1, len(samples) // 10)
    return tenth / sum(samples[:tenth]), tenth / sum(samples[-tenth:])


class Fleet:
    """``workers`` registered workers plus the latency probe's, heartbeating every ``interval`` seconds."""

    def __init__(self, settings: Settings, workers: int, interval: float = 5.0) -> None:
        from cloudai.store import open_store

        self.settings, self.interval = settings, interval
        self.store = open_store(settings.store_url)
        self.redis = redis.Redis.from_url(settings.redis_url, decode_responses=True)
        self.ids: list[str] = []
        for n in range(workers):
            wid = f"fleet-{n:04d}"
            zone = {"zone": "ab"[n % 2]}
            self.store.upsert_worker(WorkerInfo(worker_id=wid, hostname="bench", queue=keys.worker_queue(wid),
                                                cpus=64, memory=256 * GiB, slots=4096, labels=zone))
            self.ids.append(wid)
        for n in range(LAT_WORKERS):
            wid = f"lat-{n:02d}"
            self.store.upsert_worker(WorkerInfo(worker_id=wid, hostname="bench", queue=keys.worker_queue(wid),
                                                cpus=1, memory=4 * GiB, slots=1, labels={"pool": "lat"}))
            self.ids.append(wid)
        self._stop = threading.Event()
        self._beats = 0
        self.beat()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def beat(self) -> None:
        """One heartbeat of every worker, as each agent sends it: Redis TIME into Redis, and into the store."""
        now = redis_now(self.redis)
        pipe = self.redis.pipeline(transaction=False)
        for wid in self.ids:
            pipe.set(keys.heartbeat(wid), stamp_ms(now), px=int(self.settings.heartbeat_timeout_s * 1000))
        pipe.execute()
        for wid in self.ids:
            self.store.heartbeat(wid, now)
        self._beats += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def library_submits(api: Any, n: int) -> list[float]:
    from cloudai.api import SubmitRequest

    rng = random.Random(1)
    took = []
    for _ in range(n):
        cpus, memory, labels = rng.choice(SHAPES)
        request = SubmitRequest(image="busybox", command="true", resources=Resources.parse(cpus, memory),
                                constraints=labels)
        started = time.perf_counter()
        task = api.submit(request)
        took.append(time.perf_counter() - started)
        assert task.status == S.QUEUED, task.pending_reason
    return took


def master_submits(url: str, token: str, n: int, clients: int) -> tuple[list[float], float]:
    """``n`` submits by ``clients`` threads, each with its own HTTP connection: every submit's seconds in the
    order they ended, and the wall time."""
    done: list[tuple[float, float]] = []
    lock = threading.Lock()
    per = n // clients

    def client(k: int) -> None:
        rng = random.Random(k)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
            http.get("/v1/whoami").raise_for_status()  # the connection and the token's first check: untimed
            for _ in range(per):
                cpus, memory, labels = rng.choice(SHAPES)
                body = {"image": "busybox", "command": ["true"], "cpus": float(cpus), "memory": memory,
                        "constraints": labels}
                started = time.perf_counter()
                got = http.post("/v1/tasks", json=body)
                ended = time.perf_counter()
                if got.status_code != 201:
                    raise SystemExit(f"submit through the master: {got.status_code} {got.text}")
                with lock:
                    done.append((ended, ended - started))

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return [d for _, d in sorted(done)], wall


def freed_slot_latency(api: Any, client: redis.Redis, backlog: int, samples: int) -> list[float]:
    """Fill the probe's workers, queue ``backlog`` more of their shape (they wait), then end one running task
    at a time as its worker would and time until the next one's message is on that worker's queue."""
    from cloudai.api import SubmitRequest

    request = SubmitRequest(image="busybox", command="true", resources=Resources.parse(1, "64m"),
                            constraints={"pool": "lat"})
    for _ in range(LAT_WORKERS):
        assert api.submit(request).status == S.QUEUED
    for _ in range(backlog):
        assert api.submit(request).status == S.PENDING
    store, scheduler = api.store, api.scheduler
    latencies = []
    for i in range(samples):
        wid = f"lat-{i % LAT_WORKERS:02d}"
        queue = keys.worker_queue(wid)
        client.delete(queue)
        running = store.list_tasks(status=[S.QUEUED], worker_id=wid, limit=1)[0]
        assert store.transition(running.task_id, S.QUEUED, S.RUNNING)
        assert store.transition(running.task_id, S.RUNNING, S.COMPLETED)
        scheduler.release(store.get_task(running.task_id))
        started = time.perf_counter()
        scheduler.signal()  # what a worker's agent does after a task ends
        if client.blpop([queue], timeout=60) is None:
            raise SystemExit(f"no next task reached {queue} within 60 s")
        latencies.append(time.perf_counter() - started)
    return latencies


def metric(text: str, series: str) -> float:
    """The value of one series (``name{labels}``) in a Prometheus text page; NaN when absent."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def timed_median(fn: Callable[[], object], runs: int = 21) -> float:
    took = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        took.append(time.perf_counter() - started)
    return statistics.median(took)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--tasks", type=int, default=3000, help="submits through the library")
    parser.add_argument("--master-tasks", type=int, default=1600, help="submits through the master")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--backlog", type=int, default=2000, help="waiting tasks behind the freed slots")
    parser.add_argument("--samples", type=int, default=100, help="freed slots timed")
    args = parser.parse_args(argv)
    url, redis_proc = start_redis()
    redis.Redis.from_url(url).flushdb()
    tmp = tempfile.mkdtemp(prefix="cloudai-fleet-")
    db = f"{tmp}/store.db"
    env = {"CLOUDAI_REDIS_URL": url, "CLOUDAI_STORE_URL": f"sqlite:///{db}", "CLOUDAI_USER": "bench",
           "CLOUDAI_HEARTBEAT_TIMEOUT": "60", "CLOUDAI_DEFAULT_QUOTA_WAITING": "none",
           "CLOUDAI_API_WRITE_RATE": "0", "CLOUDAI_API_READ_RATE": "0"}
    os.environ.update(env)  # the Celery app and the server read them
    from cloudai import tokens
    from cloudai.api import CloudAI
    from cloudai.celery_app import dispatcher, make_app

    settings = Settings.from_env()
    server = None
    fleet = None
    try:
        fleet = Fleet(settings, args.workers)
        api = CloudAI(settings, dispatcher(make_app(settings)))
        print(f"{args.workers} workers registered and heartbeating (+{LAT_WORKERS} for the latency probe); "
              f"one process submits, on a shared 2-core VM")
        lib = library_submits(api, args.tasks)
        first, last = rates(lib)
        print(f"library: {args.tasks} submits, {args.tasks / sum(lib):.0f}/s; first 10% {first:.0f}/s, "
              f"last 10% {last:.0f}/s (last/first {last / first:.2f})")
        port = free_port()
        server = start_server(port)
        master = f"http://127.0.0.1:{port}"
        secret = tokens.create(api.store, "bench", expires="1h")[0]
        took, wall = master_submits(master, secret, args.master_tasks, args.clients)
        first, last = rates(took)
        n = len(took)
        print(f"master, {args.clients} clients: {n} submits, {n / wall:.0f}/s; per-request first 10% "
              f"{statistics.median(took[:n // 10]) * 1000:.1f} ms, last 10% "
              f"{statistics.median(took[-(n // 10):]) * 1000:.1f} ms (median latency)")
        client = redis.Redis.from_url(url, decode_responses=True)
        lat = sorted(freed_slot_latency(api, client, args.backlog, args.samples))
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        print(f"freed slot -> next task on its queue, {args.backlog} waiting, placed by the master's placer: "
              f"p50 {statistics.median(lat) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms")
        text = httpx.get(f"{master}/metrics", timeout=30).text
        print(f"longest scheduling step on the master: event "
              f"{metric(text, STEP_MAX_EVENT) * 1000:.1f} ms")
        total = len(api.store.list_tasks(limit=None)) if args.tasks + args.master_tasks < 200_000 else -1
        lib_list = timed_median(lambda: api.store.list_tasks(limit=100))
        http = httpx.Client(base_url=master, headers={"Authorization": f"Bearer {secret}"}, timeout=60)
        api_list = timed_median(lambda: http.get("/v1/tasks", params={"user": "all", "limit": 100}).raise_for_status())
        print(f"list of the newest 100 at {total} tasks: store {lib_list * 1000:.1f} ms, "
              f"GET /v1/tasks {api_list * 1000:.1f} ms (medians of 21)")
        used = int(client.info("memory")["used_memory"])
        size = sum(os.path.getsize(p) for p in (db, db + "-wal") if os.path.exists(p))
        print(f"Redis used_memory {used / 2**20:.1f} MiB ({used / total:.0f} B/task, messages on queues "
              f"included); store {size / 2**20:.1f} MiB ({size / total:.0f} B/task)")
    finally:
        if fleet is not None:
            fleet.stop()
        if server is not None:
            server.terminate()
            server.wait(15)
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
