"""Benchmark: CloudAI's cost over bare Docker, measured in the same run on the same machine.

1. Latency: submit-to-finished of a trivial container through CloudAI (record, queue, worker, container,
   log, archive) against `docker run --rm` of the same image and command.
2. Log throughput: N lines through the log bus to a follower against `docker logs` of the same output.

Prints ratios against the bare-Docker baseline (these machines are shared: look at ratios, not seconds).
Run it with ./scripts/bench (which starts Redis, dockerd and a worker).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from cloudai.api import CloudAI, SubmitRequest
from cloudai.logs import LogEnd
from cloudai.models import Resources
from cloudai.settings import Settings

IMAGE = os.environ.get("CLOUDAI_TEST_IMAGE", "cloudai/busybox:local")


def bare_docker(command: str) -> float:
    started = time.perf_counter()
    subprocess.run(["docker", "run", "--rm", "--entrypoint", "/bin/sh", IMAGE, "-c", command], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def through_cloudai(api: CloudAI, command: str) -> tuple[float, int]:
    started = time.perf_counter()
    task = api.submit(SubmitRequest(image=IMAGE, command=command, resources=Resources.parse(1, "256m")))
    lines = 0
    for event in api.follow(task.task_id):
        if isinstance(event, LogEnd):
            assert event.status == "completed", event
        else:
            lines += 1
    return time.perf_counter() - started, lines


def docker_logs(n: int) -> float:
    name = f"bench-{os.getpid()}"
    subprocess.run(["docker", "run", "--name", name, "--entrypoint", "/bin/sh", IMAGE, "-c", f"seq 1 {n}"],
                   check=True, stdout=subprocess.DEVNULL)
    try:
        started = time.perf_counter()
        out = subprocess.run(["docker", "logs", name], check=True, capture_output=True).stdout
        assert out.count(b"\n") == n
        return time.perf_counter() - started
    finally:
        subprocess.run(["docker", "rm", "-f", name], stdout=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--lines", type=int, default=100_000)
    args = parser.parse_args()
    api = CloudAI(Settings.from_env())

    bare = [bare_docker("true") for _ in range(args.runs)]
    ours = [through_cloudai(api, "true")[0] for _ in range(args.runs)]
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"latency   docker run --rm: {b:.3f}s   cloudai submit→end: {o:.3f}s   ratio {o / b:.2f}x")

    base = docker_logs(args.lines)
    total, lines = through_cloudai(api, f"seq 1 {args.lines}")
    assert lines == args.lines, (lines, args.lines)
    run_only = bare_docker(f"seq 1 {args.lines}")
    print(f"log       docker run+logs of {args.lines} lines: {run_only + base:.3f}s   "
          f"cloudai submit+follow: {total:.3f}s   ratio {total / (run_only + base):.2f}x   "
          f"({args.lines / total:,.0f} lines/s end to end)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
