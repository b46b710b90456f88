"""What a user sees: whole ``cloudai`` processes against plain ``docker run --rm`` (attached), in the same run.

Every case alternates A B A B after a warm-up and reports the median, min-max and the ratio of the medians,
so a noisy, shared machine moves both sides alike. Cases:

- ``trivial``: ``cloudai submit -f --worker W IMG -- true`` vs ``docker run --rm IMG true``.
- ``lines``: ``cloudai submit -f IMG -- seq 1 N`` vs ``docker run --rm IMG seq 1 N``, both into a pipe that
  counts every line (a run that loses one fails the benchmark); peak RSS of the CLI and of the worker.
- ``many``: 100 trivial tasks, 8 at a time (``xargs -P 8``), vs the same 100 ``docker run --rm`` with ``xargs -P 8``:
  each followed to its end (``submit -f``: whole processes, first submit to last exit), and in the issue's form
  (``submit -q``, first submit to the last completion the store records).
- ``help``: ``cloudai --help``, absolute (no baseline exists).
- ``trivial`` and ``many`` again with ``CLOUDAI_CMDSERVER=off``: each command in its own interpreter, as before the
  command server (cli/cmdserver.py). The other rows use the server, as a user's commands do after their first;
  the run starts it first and prints how many commands it ran at the end, so a row that missed it shows.
- ``floor``: ``python -c 'import click, httpx'`` against ``docker run --rm``: the interpreter's share, which no
  change to CloudAI can remove.

The worker must already run (``./scripts/bench`` starts one and passes its id and pid). The ``cloudai`` commands
go through the master with a token, as every user's do: the run starts a ``cloudai server`` of its own.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

IMAGE = os.environ.get("CLOUDAI_TEST_IMAGE", "cloudai/busybox:local")


@dataclass
class Sample:
    seconds: float
    peak_rss_kib: int = 0  # the measured command's own peak RSS


@dataclass
class Row:
    case: str
    ours: list[Sample]
    base: list[Sample]
    note: str = ""

    @staticmethod
    def _median(samples: list[Sample]) -> float:
        return statistics.median(s.seconds for s in samples)

    def line(self) -> str:
        o = self._median(self.ours)
        spread = f"{min(s.seconds for s in self.ours):.3f}-{max(s.seconds for s in self.ours):.3f}"
        if not self.base:
            return f"| {self.case} | {o:.3f} s ({spread}) | | | {self.note} |"
        b = self._median(self.base)
        bspread = f"{min(s.seconds for s in self.base):.3f}-{max(s.seconds for s in self.base):.3f}"
        return f"| {self.case} | {o:.3f} s ({spread}) | {b:.3f} s ({bspread}) | {o / b:.2f}x | {self.note} |"


def cloudai_cmd() -> list[str]:
    """The installed console script, as a user runs it (not ``python -m``)."""
    found = shutil.which("cloudai")
    if found is None:
        sys.exit("the cloudai command is not on PATH; run ./scripts/bench")
    return [found]


def timed(argv: Sequence[str], count_lines: int | None = None, shell: bool = False,
          env: dict[str, str] | None = None) -> Sample:
    """Run ``argv`` to its end; with ``count_lines``, its stdout must carry exactly lines 1..N of ``seq``."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv if not shell else argv[0], shell=shell, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    expected = 1
    numbered = 0
    for raw in proc.stdout:
        if count_lines is not None and raw[:1].isdigit():
            value = int(raw)
            if value != expected:
                raise SystemExit(f"{' '.join(argv)}: line {expected} expected, got {value}")
            expected += 1
            numbered += 1
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}")
    if count_lines is not None and numbered != count_lines:
        raise SystemExit(f"{' '.join(argv)}: {numbered} of {count_lines} lines arrived")
    return Sample(elapsed, usage.ru_maxrss)


def alternate(ours: Callable[[], Sample], base: Callable[[], Sample] | None, runs: int,
              warmup: int = 1) -> tuple[list[Sample], list[Sample]]:
    for _ in range(warmup):
        ours()
        if base:
            base()
    a: list[Sample] = []
    b: list[Sample] = []
    for _ in range(runs):
        a.append(ours())
        if base:
            b.append(base())
    return a, b


def worker_peak_rss_kib(pid: int | None) -> int:
    """The worker's peak RSS so far (VmHWM), 0 when unknown."""
    if not pid:
        return 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def docker_cmd(*command: str) -> list[str]:
    return ["docker", "run", "--rm", IMAGE, *command]


def own_process() -> dict[str, str]:
    """The environment of a command that runs in its own interpreter, without the command server."""
    return {**os.environ, "CLOUDAI_CMDSERVER": "off"}


def case_trivial(worker: str, runs: int, own: bool = False) -> Row:
    cli = cloudai_cmd()
    ours, base = alternate(lambda: timed([*cli, "submit", "-f", "--worker", worker, "--cpus", "0.5", "-m", "64m",
                                          IMAGE, "--", "true"], env=own_process() if own else None),
                           lambda: timed(docker_cmd("true")), runs)
    return Row("trivial task, submit -f vs docker run --rm" + (", CLOUDAI_CMDSERVER=off" if own else ""), ours, base)


def case_lines(lines: int, runs: int, worker_pid: int | None) -> Row:
    cli = cloudai_cmd()
    ours, base = alternate(lambda: timed([*cli, "submit", "-f", "-m", "256m", IMAGE, "--", "seq", "1", str(lines)],
                                         count_lines=lines),
                           lambda: timed(docker_cmd("seq", "1", str(lines)), count_lines=lines), runs)
    # the CLI's peak RSS from one more run in its own process: through the command server the measured process
    # is only the launcher, and the viewer (the same code) runs in the server's child
    cli_rss = timed([*cli, "submit", "-f", "-m", "256m", IMAGE, "--", "seq", "1", str(lines)], count_lines=lines,
                    env=own_process()).peak_rss_kib // 1024
    worker_rss = worker_peak_rss_kib(worker_pid) // 1024
    return Row(f"{lines:,} lines into a pipe", ours, base,
               f"all lines, in order; peak RSS: CLI {cli_rss} MiB (in its own process), worker {worker_rss or '?'} MiB")


def case_many(tasks: int, parallel: int, runs: int, own: bool = False) -> Row:
    cli = " ".join(cloudai_cmd())
    ours_cmd = (f"seq 1 {tasks} | {'CLOUDAI_CMDSERVER=off ' if own else ''}xargs -P {parallel} -I{{}} {cli} submit "
                f"-f -q --cpus 0.2 -m 32m {IMAGE} -- true >/dev/null")
    base_cmd = f"seq 1 {tasks} | xargs -P {parallel} -I{{}} docker run --rm {IMAGE} true >/dev/null"
    ours, base = alternate(lambda: timed([ours_cmd], shell=True), lambda: timed([base_cmd], shell=True), runs,
                           warmup=0)
    return Row(f"{tasks} trivial tasks, {parallel} at a time" + (", CLOUDAI_CMDSERVER=off" if own else ""), ours,
               base, "each task followed to its end (submit -f), so the time is first submit to last completed")


def case_many_quiet(tasks: int, parallel: int, runs: int) -> Row:
    """The issue's own form: ``xargs -P 8 cloudai submit -q`` (each command ends once its task is queued), timed
    from the first submit to the last task's completion as the store records it (the bench reads the store
    the master writes)."""
    from cloudai.models import TaskStatus
    from cloudai.store import open_store

    store = open_store(MASTER_STORE[0])
    cli = " ".join(cloudai_cmd())
    ours_cmd = f"seq 1 {tasks} | xargs -P {parallel} -I{{}} {cli} submit -q --cpus 0.2 -m 32m {IMAGE} -- true"
    base_cmd = f"seq 1 {tasks} | xargs -P {parallel} -I{{}} docker run --rm {IMAGE} true >/dev/null"

    def ours() -> Sample:
        started = time.time()  # the wall clock, as the store's completed_at
        ids = subprocess.run(ours_cmd, shell=True, check=True, capture_output=True, text=True).stdout.split()
        assert len(ids) == tasks, ids
        waiting, done = set(ids), []
        deadline = time.monotonic() + 600
        while waiting:
            if time.monotonic() > deadline:
                raise SystemExit(f"{len(waiting)} tasks did not finish")
            time.sleep(0.1)
            for task in [store.get_task(i) for i in waiting]:
                if task is not None and task.status.terminal:
                    if task.status != TaskStatus.COMPLETED or task.completed_at is None:
                        raise SystemExit(f"task {task.task_id} ended {task.status.value}")
                    waiting.discard(task.task_id)
                    done.append(task.completed_at.timestamp())
        return Sample(max(done) - started)

    mine, base = alternate(ours, lambda: timed([base_cmd], shell=True), runs, warmup=0)
    return Row(f"{tasks} trivial tasks, {parallel} at a time, submit -q", mine, base,
               "the issue's form: first submit to the last completion the store records")


def case_floor(runs: int) -> Row:
    """What any Python command on the same libraries pays before it does anything: the interpreter starting and
    importing click and the client library (httpx). It shows how much of the trivial task's ratio is left to
    CloudAI's own code."""
    library = "httpx"
    # the CLI's client keeps httpx's own command-line tool and trio unloaded (cli/lean_httpx.py): so does the floor
    from cloudai.cli.lean_httpx import SKIPPED

    blocked = f"import sys; sys.modules.update(dict.fromkeys({SKIPPED!r})); "
    python = os.path.join(os.path.dirname(cloudai_cmd()[0]), "python")
    ours, base = alternate(lambda: timed([python, "-c", f"{blocked}import click, {library}"]),
                           lambda: timed(docker_cmd("true")), runs)
    return Row(f"floor: python -c 'import click, {library}' vs docker run --rm true", ours, base,
               "no CloudAI code runs: the part of a submit's cost that is the interpreter's")


def cmdserver_state() -> str:
    """``cloudai cmdserver status``'s line."""
    return subprocess.run([*cloudai_cmd(), "cmdserver", "status"], capture_output=True, text=True).stdout.strip()


def start_cmdserver() -> str:
    """Start the command server as a user's first command does, and wait for it to listen."""
    subprocess.run([*cloudai_cmd(), "--help"], stdout=subprocess.DEVNULL, check=True)
    deadline = time.monotonic() + 30
    while not (state := cmdserver_state()).startswith("running"):
        if time.monotonic() > deadline:
            sys.exit(f"the command server did not start: {state}")
        time.sleep(0.1)
    return state


def case_help(runs: int) -> Row:
    cli = cloudai_cmd()
    ours, _ = alternate(lambda: timed([*cli, "--help"]), None, runs)
    return Row("cloudai --help", ours, [], "no baseline; target 0.15 s")


MASTER_STORE: list[str] = []  # the store URL the master runs on (the users' environment has none)


def through_master() -> Callable[[], None]:
    """Start ``cloudai server`` on a free port, point this process's children at it with a fresh token, and
    return what stops it."""
    from bench.api import free_port, start_server
    from cloudai import tokens
    from cloudai.settings import Settings
    from cloudai.store import open_store

    settings = Settings.from_env()
    MASTER_STORE[:] = [settings.store_url]
    port = free_port()
    server = start_server(port)
    secret = tokens.create(open_store(settings.store_url), settings.user, expires="1h")[0]
    for name in ("CLOUDAI_REDIS_URL", "CLOUDAI_STORE_URL"):  # a remote user has neither
        os.environ.pop(name, None)
    os.environ.update(CLOUDAI_API_URL=f"http://127.0.0.1:{port}", CLOUDAI_TOKEN=secret,
                      XDG_CONFIG_HOME=os.path.join(os.getcwd(), ".cache", "bench-xdg"))

    def stop() -> None:
        server.terminate()
        server.wait(15)

    return stop


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="measured runs per side (after one warm-up)")
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--million", action="store_true", help="also 1,000,000 lines (slow)")
    parser.add_argument("--many", type=int, default=100, help="tasks in the many-small-tasks case (0: skip)")
    parser.add_argument("--cases", default="help,floor,trivial,lines,many")
    args = parser.parse_args()
    stop = through_master()
    try:
        return run(args)
    finally:
        stop()


def run(args: argparse.Namespace) -> int:
    worker = os.environ.get("CLOUDAI_BENCH_WORKER", "bench-worker")
    worker_pid = int(os.environ["CLOUDAI_BENCH_WORKER_PID"]) if os.environ.get("CLOUDAI_BENCH_WORKER_PID") else None
    cases = set(args.cases.split(","))
    print(f"# cloudai (through the master at {os.environ['CLOUDAI_API_URL']}) vs docker run --rm; "
          f"{args.runs} alternating runs each, median (min-max)")
    print(f"# command server: {start_cmdserver()}\n")
    print("| what | cloudai | docker run --rm | ratio | notes |\n|---|---|---|---|---|")
    rows: list[Row] = []
    if "help" in cases:
        rows.append(case_help(args.runs))
        print(rows[-1].line(), flush=True)
    if "floor" in cases:
        rows.append(case_floor(args.runs))
        print(rows[-1].line(), flush=True)
    if "trivial" in cases:
        rows.append(case_trivial(worker, args.runs))
        print(rows[-1].line(), flush=True)
        rows.append(case_trivial(worker, args.runs, own=True))
        print(rows[-1].line(), flush=True)
    if "lines" in cases:
        rows.append(case_lines(args.lines, args.runs, worker_pid))
        print(rows[-1].line(), flush=True)
        if args.million:
            rows.append(case_lines(1_000_000, max(1, args.runs // 2), worker_pid))
            print(rows[-1].line(), flush=True)
    if "many" in cases and args.many:
        rows.append(case_many(args.many, 8, max(1, args.runs // 3)))
        print(rows[-1].line(), flush=True)
        rows.append(case_many(args.many, 8, max(1, args.runs // 3), own=True))
        print(rows[-1].line(), flush=True)
        rows.append(case_many_quiet(args.many, 8, max(1, args.runs // 3)))
        print(rows[-1].line(), flush=True)
    print(f"\n# command server at the end: {cmdserver_state()}")
    print(f"(self: peak RSS of this script {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
