"""The events of a task's log: lines and the end marker. Light (no Redis import): the CLI uses them in both
modes; :mod:`cloudai.logs` reads and writes them on Redis."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
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


__all__ = ["LogEnd", "LogEvent", "LogLine"]
