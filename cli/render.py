"""How tasks, workers and logs look on a terminal (rich) and as JSON."""

from __future__ import annotations

import json
import os
import re
import select
import sys
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO

import click

from cloudai.errors import ExitCode
from cloudai.logevents import LogEnd
from cloudai.models import Task, TaskStatus, format_bytes, utcnow
from cloudai.workerview import WorkerView

if TYPE_CHECKING:  # rich costs ~60 ms to import: only the commands that print tables load it
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

S = TaskStatus
STATUS_STYLE = {
    "pending": "yellow", "queued": "cyan", "running": "blue", "completed": "green", "failed": "red",
    "cancelled": "magenta", "timeout": "red", "lost": "red",
}


# C0 and C1 controls, DEL, lone surrogates (invalid UTF-8 the CLI received), and the bidi overrides that can
# make a terminal show text in another order than it is ("Trojan Source")
_BIDI = r"\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff" + _BIDI + "]")
_UNSAFE_KEEP_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff" + _BIDI + "]")


_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _SHORT.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def visible(value: object, keep_lines: bool = False) -> str:
    """A user-supplied value made safe for a terminal: every control character (ESC, \\r, NUL, ...), lone
    surrogate and bidi override is shown as an escape such as ``\\x1b`` instead of acting on the terminal.
    ``keep_lines`` keeps newlines and tabs (multi-line error messages). Rich markup is not touched here:
    :func:`cell` makes table cells that rich shows literally."""
    return (_UNSAFE_KEEP_LINES if keep_lines else _UNSAFE).sub(_escape_char, str(value))


def cell(value: object, style: str = "") -> Text:
    """A table cell that shows ``value`` exactly: never parsed as rich markup (``[/]`` stays ``[/]``), with
    control characters made visible."""
    from rich.text import Text

    return Text(visible(value), style=style)


def write_text(out: TextIO, text: str) -> None:
    """``out.write(text)``, but to a real file (the terminal, a pipe) with :func:`os.write` until every byte is
    taken. Through the text layer, CPython 3.11's buffered writer lost bytes of large writes to a full pipe when
    the process was stopped and continued meanwhile (Ctrl-Z and `fg`, a debugger, a sampling profiler): a
    quarter of a 300,000-line log in tests/integration/test_cli_output.py. A short write is resumed here where
    it stopped, and a full non-blocking pipe is waited on."""
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (io.UnsupportedOperation is both of the latter)
        out.write(text)
        return
    out.flush()  # what went through the text layer before comes first
    errors = getattr(out, "errors", None) or "strict"  # a character the output's encoding lacks: "?", not a crash
    encoding = getattr(out, "encoding", None) or "utf-8"
    data = memoryview(text.encode(encoding, "replace" if errors == "strict" else errors))
    while data:
        try:
            data = data[os.write(fd, data):]
        except BlockingIOError:
            select.select([], [fd], [])


def exit_code_for(status: str, exit_code: int | None) -> int:
    """The CLI's exit code for a finished task: the container's own code when it ran (see ExitCode)."""
    if status in (S.COMPLETED.value, S.FAILED.value) and exit_code is not None:
        return exit_code
    return {
        S.COMPLETED.value: ExitCode.OK,
        S.FAILED.value: ExitCode.NOT_STARTED,
        S.CANCELLED.value: ExitCode.CANCELLED,
        S.TIMEOUT.value: ExitCode.TIMEOUT,
        S.LOST.value: ExitCode.LOST,
    }.get(status, ExitCode.ERROR)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(type(value).__name__)


def to_json(data: Any) -> str:
    return json.dumps(data, default=_json_default, indent=2, sort_keys=True)


def task_json(task: Task) -> str:
    return to_json(task.to_doc())


def age(when: datetime | None) -> str:
    if when is None:
        return "-"
    seconds = max(0, int((utcnow() - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def limits(task: Task) -> str:
    text = task.resources.describe()
    if task.gpu_ids:
        text += f" (GPU {','.join(task.gpu_ids)})"
    if task.timeout_s:
        text += f", timeout {task.timeout_s:g}s"
    return text


def status_lines(task: Task) -> list[tuple[str, str]]:
    rows = [
        ("task", task.task_id + (f"  ({task.name})" if task.name else "")),
        ("user", task.user_id),
        ("status", task.status.value),
        ("worker", task.worker_id or "-"),
        ("image", task.docker_image),
        ("command", task.command if task.command is not None else "(image default)"),
        ("limits", limits(task)),
        ("created", f"{task.created_at:%Y-%m-%d %H:%M:%S} UTC ({age(task.created_at)})"),
    ]
    if task.started_at:
        rows.append(("started", f"{task.started_at:%Y-%m-%d %H:%M:%S} UTC"))
    if task.completed_at:
        rows.append(("ended", f"{task.completed_at:%Y-%m-%d %H:%M:%S} UTC"))
    if task.exit_code is not None:
        rows.append(("exit code", str(task.exit_code)))
    if task.oom_killed:
        rows.append(("oom killed", "yes"))
    if task.after:
        rows.append(("after", ", ".join(task.after)))
    if task.status == S.PENDING and task.pending_reason:
        rows.append(("waiting", task.pending_reason))
    if task.error:
        rows.append(("reason", task.error.message))
    if task.attempt > 1 or task.retries:
        rows.append(("attempt", f"{task.attempt} of {task.retries + 1}"))
    return rows


def print_status(task: Task, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    width = max(len(k) for k, _ in status_lines(task))
    for key, value in status_lines(task):
        out.write(f"{key.rjust(width)}: {visible(value)}\n")


def final_block(end: LogEnd, color: bool) -> str:
    """``Task Completed`` / ``Task Failed — exit 137, killed: out of memory, limit 64 MiB``."""
    title = f"Task {end.status.capitalize()}"
    details = []
    if end.exit_code is not None and end.status != S.COMPLETED.value:
        details.append(f"exit {end.exit_code}")
    if end.reason and end.reason != f"exited with code {end.exit_code}":
        details.append(visible(end.reason))
    text = title + (" — " + ", ".join(details) if details else "")
    return click.style(text, fg=STATUS_STYLE.get(end.status, "white"), bold=True) if color else text


def task_table(tasks: list[Task]) -> Table:
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("TASK", "USER", "STATUS", "WORKER", "IMAGE", "COMMAND", "LIMITS", "CREATED", "EXIT", "NOTE"):
        table.add_column(col, no_wrap=True)
    for t in tasks:
        table.add_row(
            cell(t.task_id), cell(t.user_id), cell(t.status.value, STATUS_STYLE.get(t.status.value, "white")),
            cell(t.worker_id or "-"), cell(t.docker_image), cell(_one_line(t.command or "", 60)),
            cell(t.resources.describe()), cell(age(t.created_at)), cell("-" if t.exit_code is None else t.exit_code),
            cell(_note(t)),
        )
    return table


def _note(task: Task) -> str:
    """Why a task waits (pending), or why it ended without running (a failed dependency, an error)."""
    if task.status == S.PENDING:
        return _one_line(task.pending_reason or "", 70)
    if task.status.terminal and task.error and task.exit_code is None:
        return _one_line(task.error.message, 70)
    return ""


def _one_line(text: str, width: int) -> str:
    """A multi-line shell script as one short line for a table cell."""
    flat = visible(" ".join(text.split()))
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def worker_table(views: list[WorkerView]) -> Table:
    """Workers: capacity, use and room. Through the master a user's view counts only their own tasks' use
    (other users' load is not theirs to see): the columns say "yours"."""
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    yours = " (YOURS)" if any(v.usage_of is not None for v in views) else ""
    for col in ("WORKER", "STATE", f"CPUS{yours}", f"MEMORY{yours}", f"GPUS{yours}", f"TASKS{yours}", "ROOM",
                "HEARTBEAT", "LABELS"):
        table.add_column(col, no_wrap=True)
    for v in views:
        w = v.info
        state = w.state.value if v.alive or w.state.value == "offline" else f"{w.state.value} (silent)"
        gpus = f"{len(v.used_gpu_ids)}/{len(w.gpu_ids)}" + (f" [{','.join(w.gpu_ids)}]" if w.gpu_ids else "")
        room = "-" if v.has_room is None else ("yes" if v.has_room else "full")
        table.add_row(*map(cell, (
            w.worker_id, state, f"{v.used_cpus:g}/{w.cpus:g}",
            f"{format_bytes(v.used_memory)}/{format_bytes(w.memory)}", gpus, f"{v.tasks}/{w.slots}", room,
            f"{v.heartbeat_age_s:.0f}s ago", ",".join(f"{k}={val}" for k, val in w.labels.items()) or "-",
        )))
    return table


def worker_json(views: list[WorkerView]) -> str:
    return to_json([v.to_doc() for v in views])


def console() -> Console:
    from rich.console import Console

    # a pipe gets whole rows (for grep), a terminal gets rows fitted to its width
    return Console(highlight=False, width=None if sys.stdout.isatty() else 250)
