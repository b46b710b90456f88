"""Benchmark: the cost of going through the master. A trivial task, submit to end marker, as a user runs it
(the whole `cloudai submit -f` process), in direct mode (Redis and the store) and through `cloudai server`
(CLOUDAI_API_URL + a token), alternating, in the same run. Prints medians and the ratio (machines are shared:
look at the ratio). Also: 10,000 log lines followed with `cloudai logs -f` both ways.

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

from cloudai import tokens
from cloudai.settings import Settings
from cloudai.store import open_store

IMAGE = os.environ.get("CLOUDAI_TEST_IMAGE", "cloudai/busybox:local")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def timed(env: dict[str, str], *args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def start_server(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "server", "--port", str(port), "--log-level",
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
    parser.add_argument("--lines", type=int, default=10_000)
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
        submit = ("submit", "-f", "-m", "64m", IMAGE, "true")
        timed(direct, *submit)  # warm the image cache and the worker
        d_times, a_times = [], []
        for _ in range(args.runs):  # alternating: both see the same machine load
            d_times.append(timed(direct, *submit))
            a_times.append(timed(api, *submit))
        d, a = statistics.median(d_times), statistics.median(a_times)
        print(f"submit -f → end   direct: {d:.3f}s   through the API: {a:.3f}s   ratio {a / d:.2f}x "
              f"(median of {args.runs}, alternating)")
        out = subprocess.run([sys.executable, "-m", "cli.main", "submit", "-q", IMAGE, f"seq 1 {args.lines}"],
                             env=direct, check=True, capture_output=True, text=True).stdout.strip()
        timed(direct, "logs", "-f", out)  # wait for its end
        logs = ("logs", "-f", out)
        ld, la = [], []
        for _ in range(args.runs):
            ld.append(timed(direct, *logs))
            la.append(timed(api, *logs))
        d, a = statistics.median(ld), statistics.median(la)
        print(f"logs -f of {args.lines} lines   direct: {d:.3f}s   through the API (SSE): {a:.3f}s   "
              f"ratio {a / d:.2f}x")
    finally:
        server.terminate()
        server.wait(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
