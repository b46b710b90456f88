"""One attempt's log budget: how many bytes of a container's output its log keeps (``CLOUDAI_LOG_MAX_BYTES``).

Within the budget every line is kept. The line that would pass it is replaced by one marker line
(:data:`BUDGET_MARK`); later output is read (so the container never blocks on a full pipe) and counted but not
kept, and the log ends with a line saying how much was not kept (:meth:`LogBudget.summary`). By the operator's
policy (``CLOUDAI_LOG_OVER_BUDGET``) the task keeps running (``keep-running``, the default) or is stopped
(``stop``). The budget counts UTF-8 bytes of the text plus one per line (its newline); CloudAI's own lines
(attempt markers, notes) don't count.

What is kept is decided line by line from the container's output alone, so reading the same output again (a
re-attach, Docker's log after the attach stream broke) keeps the same lines.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator

from cloudai.logevents import LogLine

BUDGET_MARK = "[cloudai] log budget of {budget} reached (CLOUDAI_LOG_MAX_BYTES): {then}"
SUMMARY = "[cloudai] {size} of further output in {lines} lines not kept: the log budget is {budget}"


def size_text(size: int) -> str:
    """``1 GiB``, ``5 MiB``, ``123 bytes``."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.4g} {unit}"
    return f"{size} bytes"


def lines_bytes(texts: list[str]) -> int:
    """UTF-8 bytes of ``texts``, a newline each (at C speed for ASCII text, the common case)."""
    if all(map(str.isascii, texts)):
        return sum(map(len, texts)) + len(texts)
    return sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) + len(texts)


class LogBudget:
    """The budget of one attempt's log. :meth:`admit` takes the container's lines in order (``(text, ts)``) and
    returns those to keep. ``seen`` counts the container lines taken, kept or not."""

    def __init__(self, max_bytes: int, stop: bool = False) -> None:
        self.max_bytes = max_bytes  # 0: no budget
        self.stop = stop
        self.used = 0
        self.seen = 0
        self.exceeded = False
        self.dropped_bytes = 0
        self.dropped_lines = 0

    @property
    def marker(self) -> str:
        then = "the task is stopped" if self.stop else "further output is not kept; the task keeps running"
        return BUDGET_MARK.format(budget=size_text(self.max_bytes), then=then)

    @classmethod
    def is_marker(cls, text: str) -> bool:
        return text.startswith("[cloudai] log budget of ")

    def resume(self, kept: int, last: LogLine | None) -> None:
        """Continue the budget of an attempt whose log already holds ``kept`` lines of its container's output,
        the last one ``last``: a re-attaching worker. When that is the marker, the budget was spent (the lines
        before it were kept, the rest is counted from here on); otherwise the bytes already kept are not known
        and the count starts again."""
        if last is not None and self.is_marker(last.text) and kept > 0:
            self.exceeded = True
            self.seen = kept - 1  # the marker stands in place of the first line not kept
        else:
            self.seen = kept

    def admit(self, lines: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The lines to keep of the next ones (see the module docstring)."""
        self.seen += len(lines)
        if self.exceeded:
            self._drop(lines)
            return []
        size = lines_bytes([text for text, _ in lines])
        if not self.max_bytes or self.used + size <= self.max_bytes:
            self.used += size
            return lines
        kept: list[tuple[str, str]] = []
        for n, (text, ts) in enumerate(lines):
            line = lines_bytes([text])
            if self.used + line > self.max_bytes:
                self.exceeded = True
                self._drop(lines[n:])
                kept.append((self.marker, ts))
                break
            self.used += line
            kept.append((text, ts))
        return kept

    def _drop(self, lines: list[tuple[str, str]]) -> None:
        self.dropped_lines += len(lines)
        self.dropped_bytes += lines_bytes([text for text, _ in lines])

    def summary(self) -> str | None:
        """The log's last line when the budget was spent: how much was not kept."""
        if not self.exceeded:
            return None
        return SUMMARY.format(size=size_text(self.dropped_bytes), lines=self.dropped_lines,
                              budget=size_text(self.max_bytes))



class Replay:
    """The container's whole output read again (Docker's log, from its first line), mapped to the log lines it
    made: the attempt's log started after line ``base``, and its budget was in state ``start`` (a copy taken when
    supervision began) at container line ``start.seen``. :attr:`budget` is the budget's state after the lines
    read so far."""

    def __init__(self, start: LogBudget, base: int) -> None:
        self.budget = copy.copy(start)
        self.base = base
        self._before = start.seen

    def lines(self, lines: Iterable[tuple[str, str]]) -> Iterator[tuple[int, int, str, str]]:
        """``(n, seq, text, ts)``: container line ``n`` and the log line ``seq`` it made. The lines the budget
        did not keep give nothing; the marker comes in place of the first of them."""
        seq = self.base
        for n, line in enumerate(lines, 1):
            if n <= self._before:  # before supervision began: what the log kept then
                seq = self.base + n
                yield n, seq, line[0], line[1]
                continue
            for text, ts in self.budget.admit([line]):
                seq += 1
                yield n, seq, text, ts
