"""The events of a task's log: lines and the end marker. Light (no Redis import): the CLI uses them in both
modes; :mod:`cloudai.logs` reads and writes them on Redis."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

if TYPE_CHECKING:
    from cloudai.models import Task


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

    @classmethod
    def of_task(cls, task: Task) -> LogEnd:
        """The end marker a finished task's log closes with."""
        return cls(task.status.value, task.exit_code, task.error.message if task.error else None)


LogEvent = LogLine | LogEnd


class LineBatch(Sequence[LogLine]):
    """Consecutive lines ``first``, ``first + 1``, ... kept as two columns, as a stream read or an SSE batch
    carries them. It reads as a sequence of :class:`LogLine` (each made when it is taken), and a viewer that
    only prints uses ``texts`` and ``stamps`` as they are: a follower of a million-line log made a million line
    objects only to take their text out again (two thirds of the CLI's CPU per line).

    A batch read from the stream may hold its entries' columns still as the JSON text they are stored as
    (:meth:`add_entry`): they are decoded on the first read of ``texts`` or ``stamps``, and the master's JSON
    SSE passes them on without decoding them at all (:meth:`json_columns`; that decode and encode were two
    thirds of its CPU per line). An entry's count (its ``n`` field) is its number of lines, as for the stream's
    seqs; the writer writes ``n`` texts and ``n`` timestamps. A decoded entry is held to ``n``; the pass-through
    trusts the writer's shape (it checks only that each array is one line of JSON). ``texts`` and ``stamps``
    are read-only: a batch grows by :meth:`add_entry`."""

    __slots__ = ("first", "_texts", "_stamps", "_count", "_raw")

    def __init__(self, first: int, texts: list[str], stamps: list[str]) -> None:
        self.first = first
        self._texts = texts
        self._stamps = stamps
        self._count = len(texts)
        # entries not decoded yet: their lines' JSON arrays, their timestamps' and their counts
        self._raw: tuple[list[str], list[str], list[int]] | None = None

    def add_entry(self, count: int, lines_json: str, stamps_json: str) -> None:
        """Append one stream entry's ``count`` lines as its ``l`` and ``t`` fields hold them (JSON arrays),
        decoded when they are first read."""
        if self._raw is None:
            self._raw = ([], [], [])
            if self._count:  # lines already decoded go first, as one more entry
                self._raw[0].append(json.dumps(self._texts))
                self._raw[1].append(json.dumps(self._stamps))
                self._raw[2].append(self._count)
            self._texts, self._stamps = [], []
        self._raw[0].append(lines_json)
        self._raw[1].append(stamps_json)
        self._raw[2].append(count)
        self._count += count

    def _decode(self) -> None:
        if self._raw is None:
            return
        texts: list[str] = []
        stamps: list[str] = []
        for lines_json, stamps_json, count in zip(*self._raw, strict=True):
            entry_texts, entry_stamps = entry_columns(lines_json, stamps_json)
            if len(entry_texts) != count:  # not as the writer writes them: held to the count the seqs follow
                entry_texts, entry_stamps = fit_column(entry_texts, count), fit_column(entry_stamps, count)
            texts += entry_texts
            stamps += entry_stamps
        self._texts, self._stamps, self._raw = texts, stamps, None

    @property
    def texts(self) -> list[str]:
        self._decode()
        return self._texts

    @property
    def stamps(self) -> list[str]:
        self._decode()
        return self._stamps

    def json_columns(self, stamps: bool = True) -> tuple[str, str | None]:
        """``texts`` and (with ``stamps``, else None) ``stamps`` as JSON arrays: while not decoded, the stored
        entries' own arrays joined."""
        if self._raw is not None and all(map(_plain_array, self._raw[0])) and all(map(_plain_array, self._raw[1])):
            return _join_arrays(self._raw[0]), _join_arrays(self._raw[1]) if stamps else None
        return json.dumps(self.texts), json.dumps(self.stamps) if stamps else None

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> LogLine: ...
    @overload
    def __getitem__(self, index: slice) -> LineBatch: ...

    def __getitem__(self, index: int | slice) -> LogLine | LineBatch:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self.texts))
            if step != 1:
                raise ValueError("a LineBatch slices with step 1 only")
            return LineBatch(self.first + start, self.texts[start:stop], self.stamps[start:stop])
        i = index + len(self.texts) if index < 0 else index
        if not 0 <= i < len(self.texts):
            raise IndexError("LineBatch index out of range")
        return LogLine(self.first + i, self.texts[i], self.stamps[i])

    def __iter__(self) -> Iterator[LogLine]:
        return map(LogLine, range(self.first, self.first + len(self.texts)), self.texts, self.stamps)

    def __eq__(self, other: object) -> bool:  # equal to any sequence of the same lines (a list of them too)
        return isinstance(other, Sequence) and len(other) == len(self) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # mutable columns, as a list

    def __repr__(self) -> str:
        return f"LineBatch({self.first}, {self.texts!r}, {self.stamps!r})"


def entry_columns(lines_json: str, stamps_json: str) -> tuple[list[str], list[str]]:
    """A stream entry's texts and timestamps from its ``l`` and ``t`` fields, as long as each other."""
    texts = json.loads(lines_json)
    stamps = json.loads(stamps_json)
    if len(stamps) != len(texts):  # an entry without (all) its timestamps
        stamps = fit_column(stamps, len(texts))
    return texts, stamps


def fit_column(column: list[str], count: int) -> list[str]:
    """``column`` cut or padded with ``""`` to ``count`` items (timestamps missing from a line's entry)."""
    return (column + [""] * count)[:count]


def _plain_array(text: str) -> bool:
    """Whether ``text`` has the shape of ``json.dumps`` of a list (``[...]``, on one line), which SSE can carry
    as it is; anything else in the stream (not our writer's) is decoded and encoded again."""
    return text[:1] == "[" and text[-1:] == "]" and "\n" not in text and "\r" not in text


def _join_arrays(arrays: list[str]) -> str:
    """JSON arrays (as ``json.dumps`` writes them) joined into one, without decoding them."""
    items = [a[1:-1] for a in arrays if a[1:-1].strip()]  # an empty one adds nothing
    return "[" + ", ".join(items) + "]"


def line_columns(lines: Sequence[Any]) -> tuple[int, int, list[str], list[str]]:
    """The first and the last seq, the texts and the timestamps of the :class:`LogLine` among ``lines`` (a
    LineBatch's own columns, as they are); ``(0, 0, [], [])`` when there is none."""
    if isinstance(lines, LineBatch):
        return lines.first, lines.first + len(lines) - 1, lines.texts, lines.stamps
    shown = [e for e in lines if isinstance(e, LogLine)]
    if not shown:
        return 0, 0, [], []
    return shown[0].seq, shown[-1].seq, [e.text for e in shown], [e.ts for e in shown]


def lines_text(lines: Sequence[Any], timestamps: bool = False) -> str:
    """The :class:`LogLine` among ``lines`` as text, a line each (``"<ts> <text>"`` with ``timestamps``), as the
    CLI prints a log and the master serves it; ``""`` when there is none."""
    _, _, texts, stamps = line_columns(lines)
    if not texts:
        return ""
    if timestamps:
        return "".join([f"{ts} {text}\n" for ts, text in zip(stamps, texts, strict=True)])
    return "\n".join(texts) + "\n"


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


__all__ = ["ATTEMPT_MARKER", "LineBatch", "LogEnd", "LogEvent", "LogLine", "attempt_marker", "attempt_section",
           "entry_columns", "fit_column", "line_columns", "lines_text"]
