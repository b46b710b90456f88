"""The events of a task's log: lines and the end marker. Light (no Redis import): the CLI uses them in both
modes; :mod:`cloudai.logs` reads and writes them on Redis."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


# not frozen: a frozen dataclass's __init__ costs 3x (object.__setattr__ per field), and a follower of a
# million-line log builds a million of these; still hashable, and nothing mutates one
@dataclass(slots=True, unsafe_hash=True)
class LogLine:
    seq: int
    text: str
    ts: str = ""


@dataclass(frozen=True)
class LogEnd:
    """The end marker: the task's final status, its container's exit code and a readable reason."""

    status: str
    exit_code: int | None = None
    reason: str | None = None


LogEvent = LogLine | LogEnd


# a retry's section of the log starts with this line, written by CloudAI itself (it has no Docker timestamp)
ATTEMPT_MARKER = "[cloudai] attempt {attempt} started"
_MARKER_RE = re.compile(r"^\[cloudai\] attempt (\d+) started")


def attempt_marker(text: str, ts: str) -> int | None:
    """The attempt number when this line is the marker a retry's section starts with (written by CloudAI, so
    it has no Docker timestamp: a container printing the same text is not taken for one)."""
    if ts:
        return None
    match = _MARKER_RE.match(text)
    return int(match.group(1)) if match else None


def attempt_section(events: Iterable[LogEvent], attempt: int) -> list[LogLine]:
    """The lines of attempt ``attempt``: attempt 1 from the start, a retry from its marker line, each up to the
    next attempt's marker."""
    current = 1
    out: list[LogLine] = []
    for event in events:
        if not isinstance(event, LogLine):
            continue
        marker = attempt_marker(event.text, event.ts)
        if marker is not None:
            current = marker
        if current == attempt:
            out.append(event)
    return out


__all__ = ["ATTEMPT_MARKER", "LogEnd", "LogEvent", "LogLine", "attempt_marker", "attempt_section"]
