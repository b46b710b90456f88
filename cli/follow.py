"""Showing a task's log: ``monitor``, ``logs -f`` and ``submit -f``."""

from __future__ import annotations

import contextlib
import os
import select
import sys
import threading
from typing import TextIO

import click

from cloudai.cli.client import Client
from cloudai.cli.render import exit_code_for, final_block, print_status, write_text
from cloudai.errors import ExitCode
from cloudai.logevents import LogEnd, lines_text


class KeyWatcher:
    """'Press any key to exit': reads the terminal in cbreak mode on a thread; restores it on exit."""

    def __init__(self) -> None:
        self.pressed = threading.Event()
        self._stop = threading.Event()
        self._fd = sys.stdin.fileno()
        self._saved: list | None = None  # type: ignore[type-arg]

    def __enter__(self) -> KeyWatcher:
        import termios
        import tty

        self._saved = termios.tcgetattr(self._fd)
        tty.setcbreak(self._fd)
        threading.Thread(target=self._watch, daemon=True).start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.2)
            if ready:
                os.read(self._fd, 64)
                self.pressed.set()
                return

    def __exit__(self, *exc: object) -> None:
        import termios

        self._stop.set()
        if self._saved is not None:
            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def stream(api: Client, task_id: str, after_seq: int = 0, timestamps: bool = False, follow: bool = True,
           out: TextIO | None = None, stop: threading.Event | None = None) -> LogEnd | None:
    """Print the log from line ``after_seq + 1``; returns the end marker, or None when stopped early or (without
    ``follow``) when the task has not ended yet."""
    out = out or sys.stdout
    color = out.isatty()

    def reconnecting(exc: Exception) -> None:
        click.echo(click.style(f"[cloudai] {exc}; reconnecting...", fg="yellow"), err=True)

    for batch in api.follow_batches(task_id, after_seq, follow=follow, on_reconnect=reconnecting,
                                    timestamps=timestamps):
        end = batch[-1] if batch and isinstance(batch[-1], LogEnd) else None
        lines = batch[:-1] if end is not None else batch
        text = lines_text(lines, timestamps) if lines else ""
        if text:
            write_text(out, text)
        if end is not None:
            out.write(final_block(end, color) + "\n")
        if lines or end is not None:
            out.flush()  # once per batch: live lines show at once, 100k lines don't cost 100k flushes
        if end is not None:
            return end
        if stop is not None and stop.is_set():
            return None
    return None


def monitor(api: Client, task_id: str, header: bool = True) -> int:
    """The seed's monitor: header, the whole log then live, a final status block. Returns the exit code."""
    task = api.get(task_id)
    interactive = _interactive()
    if interactive:
        click.clear()
    if header:
        print_status(task)
        if interactive:
            click.echo(click.style("Press any key to exit (the task keeps running)", dim=True))
        click.echo("-" * 60)
    watcher = KeyWatcher() if interactive else contextlib.nullcontext()
    with watcher as keys:
        end = stream(api, task_id, stop=keys.pressed if isinstance(keys, KeyWatcher) else None)
    if end is None:
        task = api.get(task_id)
        if task.status.terminal:  # the key came between its last lines and its end marker: it did end
            end = LogEnd.of_task(task)
            click.echo(final_block(end, sys.stdout.isatty()))
            return exit_code_for(end.status, end.exit_code)
        click.echo(f"Stopped watching; task {task_id} keeps running. `cloudai monitor {task_id}` resumes.")
        return ExitCode.OK
    return exit_code_for(end.status, end.exit_code)
