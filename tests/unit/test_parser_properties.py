"""Property tests (Hypothesis) of the parsers users type into: any input either parses to a value within the
bounds of cloudai.limits or is a ValidationError; never another exception, never an out-of-bounds value."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudai import limits
from cloudai.cli.remote import event_lines, parse_sse
from cloudai.errors import ValidationError
from cloudai.logevents import LogLine
from cloudai.models import parse_cpus, parse_duration, parse_size
from cloudai.server.logstream import sse_events

UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
ANY_INPUT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="0123456789.eE+-_ kmgtbiBKMGTsmhdnaif", max_size=20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**400), max_value=10**400),
)
settings.register_profile("cloudai", max_examples=300, deadline=None)
settings.load_profile("cloudai")


@given(ANY_INPUT)
def test_size_is_in_bounds_or_refused(value: object) -> None:
    try:
        size = parse_size(value)  # type: ignore[arg-type]
    except ValidationError as exc:
        assert exc.field == "memory"
        return
    assert isinstance(size, int) and 0 <= size <= limits.MAX_MEMORY_BYTES


@given(st.integers(min_value=1, max_value=64), st.sampled_from(sorted(UNITS)), st.sampled_from(["", "b", "ib"]),
       st.booleans())
def test_size_units(number: int, unit: str, suffix: str, upper: bool) -> None:
    text = f"{number}{unit}{suffix if unit not in ('', 'b') else ''}"
    if not unit:  # a bare number is bytes; below Docker's 6 MiB it is refused with the unit it likely lacked
        with pytest.raises(ValidationError, match=f"did you mean {number}g"):
            parse_size(text)
        return
    assert parse_size(text.upper() if upper else text) == number * UNITS[unit]


@given(st.integers(min_value=limits.MIN_MEMORY_BYTES, max_value=limits.MAX_MEMORY_BYTES), st.booleans())
def test_a_bare_number_is_bytes(size: int, as_text: bool) -> None:
    assert parse_size(str(size) if as_text else size) == size


@given(ANY_INPUT)
def test_cpus_are_in_bounds_or_refused(value: object) -> None:
    try:
        cpus = parse_cpus(value)  # type: ignore[arg-type]
    except ValidationError as exc:
        assert exc.field == "cpus"
        return
    assert math.isfinite(cpus) and round(cpus, 9) >= 0.001 and cpus <= limits.MAX_CPUS


@given(st.floats(min_value=0.001, max_value=limits.MAX_CPUS))
def test_cpus_round_trip(cpus: float) -> None:
    assert parse_cpus(repr(cpus)) == cpus


@given(ANY_INPUT)
def test_duration_is_in_bounds_or_refused(value: object) -> None:
    try:
        seconds = parse_duration(value)  # type: ignore[arg-type]
    except ValidationError as exc:
        assert exc.field == "timeout"
        return
    assert seconds is None or (math.isfinite(seconds) and 0 < seconds <= limits.MAX_TIMEOUT_S)


@given(st.integers(0, 300), st.integers(0, 59), st.integers(0, 59), st.integers(0, 59))
def test_duration_units_add_up(days: int, hours: int, minutes: int, secs: int) -> None:
    total = days * 86400 + hours * 3600 + minutes * 60 + secs
    text = f"{days}d{hours}h{minutes}m{secs}s"
    assert parse_duration(text) == (total or None)


@given(st.text(alphabet="0123456789smhd-+.e ", min_size=1, max_size=12).filter(lambda t: "-" in t))
def test_negative_durations_are_refused(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ValidationError:
        return
    assert seconds is None or seconds >= 0


# a log line is any text without a newline (the splitter's unit); a bare CR is left out: SSE treats it as a line end
LOG_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=30)
STAMP = st.sampled_from(["", "2026-11-29T13:00:00.123456789Z"])  # CloudAI's own lines have none


@given(st.lists(st.lists(st.tuples(STAMP, LOG_TEXT), min_size=1, max_size=6), max_size=5),
       st.lists(st.integers(1, 400), max_size=12), st.booleans())
def test_log_lines_cross_sse_unchanged_however_the_stream_is_cut(batches: list[list[tuple[str, str]]],
                                                                  cuts: list[int], as_json: bool) -> None:
    sent: list[LogLine] = []
    body = "retry: 1000\n\n"
    for batch in batches:
        lines = [LogLine(len(sent) + n + 1, text, ts) for n, (ts, text) in enumerate(batch)]
        sent += lines
        body += sse_events(list(lines), timestamps=True, as_json=as_json) + ": keep-alive\n\n"
    raw = body.encode()
    points = sorted({c % (len(raw) + 1) for c in cuts})
    chunks = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    received: list[object] = []
    for event in parse_sse(chunks):
        if event.kind in ("message", "lines"):
            assert event.id is not None
            got = event_lines(event)
            assert got[-1].seq == int(event.id)  # type: ignore[union-attr]  # resuming after it loses nothing
            received += got
    assert received == sent


def _entries_line_by_line(pending: list[tuple[int, str, str]]) -> list[list[tuple[int, str, str]]]:
    """The rule, one line at a time: a new entry at BATCH_LINES lines or when the next line passes the size."""
    from cloudai.logs import BATCH_LINES, MAX_ENTRY_BYTES

    entries: list[list[tuple[int, str, str]]] = [[]]
    size = 0
    for item in pending:
        if entries[-1] and (len(entries[-1]) >= BATCH_LINES or size + len(item[1]) > MAX_ENTRY_BYTES):
            entries.append([])
            size = 0
        entries[-1].append(item)
        size += len(item[1]) + 40
    return entries if entries[0] else []


SHORT_RUNS = st.tuples(st.integers(1, 1200), st.sampled_from([0, 1, 10, 1000]))
LONG_RUNS = st.tuples(st.integers(1, 4), st.sampled_from([40_000, 300_000]))  # pass the entry's byte limit


@settings(max_examples=80)
@given(st.lists(st.one_of(SHORT_RUNS, LONG_RUNS), max_size=6))
def test_log_entries_are_cut_as_the_line_by_line_rule_cuts_them(runs: list[tuple[int, int]]) -> None:
    from cloudai.logs import LogWriter

    writer = LogWriter(None, "t", 1)  # type: ignore[arg-type]  # cutting entries needs no Redis
    pending = [(n, "x" * length, "ts") for count, length in runs for n in range(count)]
    writer.add_many([(text, ts) for _, text, ts in pending])
    cuts = writer._cuts(len(pending))
    assert cuts == [len(entry) for entry in _entries_line_by_line(pending)]
    assert sum(cuts) == len(pending)
