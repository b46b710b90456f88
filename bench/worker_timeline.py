"""Where a trivial task's time goes on the worker: the executor (no Celery, no CLI) runs ``true`` on real
Docker, Redis and a SQLite store, with every Docker API call, store write and log-bus call timestamped; the
same run times what ``docker run --rm`` asks of the engine (create, attach, start, wait; then remove),
alternating with it. Prints the median timeline of one task and the ratio of the time to the end marker (what
``submit -f`` waits for) against the engine's create-to-exit.

    python -m bench.worker_timeline [--runs 7]

Uses CLOUDAI_REDIS_URL when set, else starts a private redis-server on a free port; the image is
CLOUDAI_TEST_IMAGE (default cloudai/busybox:local).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.scheduler import start_redis
from cloudai.executor import Executor
from cloudai.logs import LogBus
from cloudai.message import RunMessage
from cloudai.models import GiB, Task, TaskStatus, WorkerInfo, utcnow
from cloudai.runtime import DockerRuntime
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore

IMAGE = os.environ.get("CLOUDAI_TEST_IMAGE", "cloudai/busybox:local")
WORKER = "timeline-w"
DOCKER_CALLS = ("inspect_image", "create_container", "attach", "start", "wait", "inspect_container",
                "remove_container")
STORE_CALLS = ("get_task", "transition", "update_task", "append_log")
BUS_CALLS = ("attempt", "last_entry", "end", "expire")


class Recorder:
    """(label, start, end) of each traced call made on the thread that runs the task."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float, float]] = []
        self.thread: int | None = None

    def trace(self, obj: Any, names: tuple[str, ...], prefix: str) -> None:
        for name in names:
            fn = getattr(obj, name, None)
            if fn is not None:
                setattr(obj, name, self._wrap(fn, f"{prefix}.{name}"))

    def _wrap(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def traced(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if threading.get_ident() == self.thread:
                    self.events.append((label, started, time.perf_counter()))
        return traced


def one_task(store: SQLiteStore, executor: Executor, recorder: Recorder) -> dict[str, tuple[float, float]]:
    """Steps of one trivial task in ms from the executor's start: label -> (start, duration)."""
    task = Task(task_id=f"tl{time.monotonic_ns() % 10**10:010d}", user_id="bench", docker_image=IMAGE,
                command="true", args=["true"], worker_id=WORKER, created_at=utcnow(), status=TaskStatus.QUEUED)
    store.create_task(task)
    recorder.events = []
    recorder.thread = threading.get_ident()
    started = time.perf_counter()
    status = executor.run(RunMessage.from_task(task).to_wire())
    assert status == "completed", status
    steps: dict[str, tuple[float, float]] = {"executor.run": (0.0, 1000 * (time.perf_counter() - started))}
    seen: dict[str, int] = {}
    for label, t0, t1 in recorder.events:
        seen[label] = seen.get(label, 0) + 1
        name = label if seen[label] == 1 else f"{label} #{seen[label]}"
        steps[name] = (1000 * (t0 - started), 1000 * (t1 - t0))
    return steps


def docker_run_rm(runtime: DockerRuntime) -> tuple[float, float]:
    """What ``docker run --rm IMAGE true`` asks of the engine: create, attach, start, wait (the exit), remove.
    Returns ms to the exit and ms to the removal."""
    api = runtime.api
    started = time.perf_counter()
    cid = api.create_container(IMAGE, command=["true"], host_config=api.create_host_config())["Id"]
    sock = api.attach_socket(cid, params={"stdout": 1, "stderr": 1, "stream": 1})
    api.start(cid)
    api.wait(cid)
    exited = time.perf_counter()
    sock.close()
    api.remove_container(cid, force=True)
    return 1000 * (exited - started), 1000 * (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    url, redis_proc = start_redis()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "CLOUDAI_REDIS_URL": url, "CLOUDAI_STORE_URL": f"sqlite:///{tmp}/store.db",
                   "CLOUDAI_WORKER_ID": WORKER}
            settings = Settings.from_env(env)
            store = SQLiteStore(f"{tmp}/store.db")
            store.upsert_worker(WorkerInfo(worker_id=WORKER, hostname="bench", queue=f"cloudai.worker.{WORKER}",
                                           cpus=2, memory=4 * GiB, gpu_ids=[], labels={}, slots=8))
            bus = LogBus.from_url(url)
            runtime = DockerRuntime()
            recorder = Recorder()
            recorder.trace(runtime.api, DOCKER_CALLS, "docker")
            recorder.trace(runtime, ("attach_chunks",), "docker")
            recorder.trace(store, STORE_CALLS, "store")
            recorder.trace(bus, BUS_CALLS, "bus")
            executor = Executor(settings, store, bus, runtime, bus.redis)
            one_task(store, executor, recorder)  # warm-up
            docker_run_rm(runtime)
            runs: list[dict[str, tuple[float, float]]] = []
            base: list[tuple[float, float]] = []
            for _ in range(args.runs):
                runs.append(one_task(store, executor, recorder))
                base.append(docker_run_rm(runtime))
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
    print(f"one trivial task on the worker (executor.run, no Celery/CLI), median of {args.runs}, ms:")
    print(f"| {'step':28} | {'starts at':>9} | {'takes':>7} |")
    labels = sorted(runs[-1], key=lambda k: runs[-1][k][0])
    for label in labels:
        got = [r[label] for r in runs if label in r]
        print(f"| {label:28} | {statistics.median(s for s, _ in got):9.1f} | "
              f"{statistics.median(d for _, d in got):7.1f} |")
    ends = [r["bus.end"][0] + r["bus.end"][1] for r in runs]
    exit_at = statistics.median(e for e, _ in base)
    print(f"\nend marker written at {statistics.median(ends):.1f} ms (min {min(ends):.1f}); the engine's "
          f"create..exit for docker run --rm: {exit_at:.1f} ms, ..removed: "
          f"{statistics.median(r for _, r in base):.1f} ms; ratio {statistics.median(ends) / exit_at:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
