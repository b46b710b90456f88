"""The CLI's output as a pipe receives it, while the process that writes it is stopped and continued (Ctrl-Z and
`fg`, a debugger, a sampling profiler): no byte of the log may go missing.

The command runs without the command server (``CLOUDAI_CMDSERVER=off``): through it, the process writing the pipe
would be the server's child, and stopping the launcher would not stop the writer."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

from cloudai.logs import LogBus
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.helpers import ROOT, cli_env, cloudai, queued_task

LINES = 300_000


def _stop_and_continue(pid: int, done: threading.Event) -> int:
    """SIGSTOP then SIGCONT ``pid`` every few ms until ``done``; how many times it did."""
    times = 0
    while not done.is_set():
        try:
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.002)
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            break
        times += 1
        time.sleep(0.004)
    return times


def test_a_log_piped_out_while_the_cli_is_stopped_and_continued_loses_no_byte(settings: Settings,
                                                                              store: SQLiteStore) -> None:
    task = queued_task(store, settings.worker_id, "true")
    bus = LogBus.from_url(settings.redis_url)
    bus.attempt(task.task_id, "a1", 3600)
    writer = bus.writer(task.task_id, execution="a1")
    writer.add_many([(str(i), "") for i in range(1, LINES + 1)])
    writer.flush()
    bus.end(task.task_id, "completed", 0, execution="a1")
    # batches of thousands of lines: each is one write of hundreds of KiB, more than a pipe holds
    proc = subprocess.Popen(cloudai("logs", task.task_id), cwd=ROOT, env=cli_env(settings, CLOUDAI_CMDSERVER="off"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    # the process this test stops is the one that writes the pipe: its stdout is our pipe's write end
    pipe = f"pipe:[{os.fstat(proc.stdout.fileno()).st_ino}]"
    assert os.readlink(f"/proc/{proc.pid}/fd/1") == pipe
    done = threading.Event()
    stops: list[int] = []
    stopper = threading.Thread(target=lambda: stops.append(_stop_and_continue(proc.pid, done)), daemon=True)
    stopper.start()
    chunks = []
    while chunk := proc.stdout.read(16384):  # a reader a little slower than the writer: the pipe fills
        chunks.append(chunk)
        time.sleep(0.0005)
    done.set()
    stopper.join(10)
    os.kill(proc.pid, signal.SIGCONT) if proc.poll() is None else None
    assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
    assert stops and stops[0] > 20  # it was stopped and continued all along
    out = b"".join(chunks).decode().split("\n")
    assert out[:LINES] == [str(i) for i in range(1, LINES + 1)]
    assert out[LINES:] == ["Task Completed", ""]
