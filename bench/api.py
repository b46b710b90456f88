"""Benchmark: the cost of reading through the master. Whole `cloudai` processes, an operator's direct mode (Redis
and the store) against a user's `cloudai server` (CLOUDAI_API_URL + a token), alternating, in the same run;
medians and the ratio (machines are shared: look at the ratio; the target is within 10%):
- `logs -f` of an ended task's 100,000 lines (over SSE through the master), and the master's CPU for each;
  then the same once its live log is gone (the archive in the store).
Submits go through the master only (one front door): bench/processes.py measures them against `docker run`.

Run it with ./scripts/bench (which starts Redis, dockerd and a worker); it starts its own server.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable

from bench import processes
from cloudai import keys, tokens
from cloudai.redisconn import connect
from cloudai.settings import Settings
from cloudai.store import open_store

IMAGE = os.environ.get("CLOUDAI_TEST_IMAGE", "cloudai/busybox:local")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def timed(env: dict[str, str], *args: str, lines: int | None = None) -> float:
    """One whole ``cloudai`` process (the installed console script); with ``lines``, its output must hold lines
    1..N of ``seq``, in order."""
    return processes.timed(["cloudai", *args], count_lines=lines, env=env).seconds


def alternate(direct: Callable[[], float], api: Callable[[], float], runs: int) -> tuple[float, float]:
    """Medians of ``runs`` alternating runs of each, after one warm-up of each."""
    from bench.processes import Sample
    from bench.processes import alternate as interleave

    d, a = interleave(lambda: Sample(direct()), lambda: Sample(api()), runs)
    return statistics.median(s.seconds for s in d), statistics.median(s.seconds for s in a)


def logs_f(direct: dict[str, str], api: dict[str, str], logs: tuple[str, ...], server_pid: int,
           args: argparse.Namespace) -> tuple[float, float, float]:
    """Medians of ``cloudai logs -f`` direct and through the master, and the master's CPU seconds per command."""
    calls = 0

    def through_master() -> float:
        nonlocal calls
        calls += 1
        return timed(api, *logs, lines=args.lines)

    before = server_cpu_s(server_pid)
    d, a = alternate(lambda: timed(direct, *logs, lines=args.lines), through_master, args.runs)
    return d, a, (server_cpu_s(server_pid) - before) / calls


def server_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "cloudai.cli.main", "server", "--port", str(port), "--log-level",
                             "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
            return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("cloudai server did not start") from None
            time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--lines", type=int, default=100_000)
    args = parser.parse_args()
    settings = Settings.from_env()
    port = free_port()
    server = start_server(port)
    try:
        secret = tokens.create(open_store(settings.store_url), settings.user, expires="1h")[0]
        direct = dict(os.environ)
        direct.pop("CLOUDAI_API_URL", None)
        api = {k: v for k, v in os.environ.items() if k not in ("CLOUDAI_REDIS_URL", "CLOUDAI_STORE_URL")}
        api.update(CLOUDAI_API_URL=f"http://127.0.0.1:{port}", CLOUDAI_TOKEN=secret,
                   XDG_CONFIG_HOME=os.path.join(os.getcwd(), ".cache", "bench-xdg"))
        submit = [sys.executable, "-m", "cloudai.cli.main", "submit", "-q", IMAGE, "seq", "1", str(args.lines)]
        out = subprocess.run(submit, env=api, check=True, capture_output=True, text=True).stdout.strip()
        timed(direct, "logs", "-f", out)  # wait for its end
        logs = ("logs", "-f", out)
        for what in ("", "expired "):
            if what:  # the live log gone (as after CLOUDAI_LOG_RETENTION): the archive in the store is read
                connect(settings.redis_url).delete(keys.log_stream(out))
            d, a, master_cpu = logs_f(direct, api, logs, server.pid, args)
            print(f"logs -f of an {what}ended task's {args.lines} lines   direct: {d:.3f}s   through the API (SSE): "
                  f"{a:.3f}s   ratio {a / d:.2f}x   (the master's CPU per logs -f: {master_cpu:.3f}s)")
    finally:
        server.terminate()
        server.wait(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
