"""LineBatch: lines as two columns that read as a sequence of LogLine; stream reads come as one when they can,
and give the same events as reading them entry by entry."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloudai.logevents import LineBatch, LogEnd, LogEvent, LogLine, line_columns
from cloudai.logfollow import LogFollow
from cloudai.logs import parse_read


def test_it_reads_as_a_sequence_of_log_lines() -> None:
    batch = LineBatch(5, ["a", "b", "c"], ["t5", "t6", ""])
    assert len(batch) == 3 and batch
    assert batch[0] == LogLine(5, "a", "t5") and batch[-1] == LogLine(7, "c", "")
    assert list(batch) == [LogLine(5, "a", "t5"), LogLine(6, "b", "t6"), LogLine(7, "c", "")]
    assert batch[1:] == LineBatch(6, ["b", "c"], ["t6", ""]) == [LogLine(6, "b", "t6"), LogLine(7, "c", "")]
    assert batch[:-1].first == 5 and len(batch[3:]) == 0 and not batch[3:]
    assert batch != [LogLine(5, "a", "t5")] and batch != "abc"
    with pytest.raises(IndexError):
        batch[3]
    assert line_columns(batch) == (5, 7, ["a", "b", "c"], ["t5", "t6", ""])
    assert line_columns([LogLine(2, "x"), LogEnd("completed", 0)]) == (2, 2, ["x"], [""])
    assert line_columns([]) == (0, 0, [], [])


def _reply(entries: list[tuple[int, dict[str, str]]]) -> Any:
    return [["cloudai:logs:t", [(f"{seq}-0", fields) for seq, fields in entries]]]


def _by_entry(entries: list[tuple[int, dict[str, str]]], after_seq: int) -> list[LogEvent]:
    """What a read gives, entry by entry: every line past ``after_seq``, end markers where they are."""
    out: list[LogEvent] = []
    for seq, fields in entries:
        if fields.get("end"):
            code = fields["exit_code"]
            out.append(LogEnd(fields["status"], int(code) if code else None, fields["reason"] or None))
            continue
        for n, (text, ts) in enumerate(zip(json.loads(fields["l"]), json.loads(fields["t"]), strict=True)):
            if seq + n > after_seq:
                out.append(LogLine(seq + n, text, ts))
    return out


ENTRY = st.tuples(st.integers(0, 3), st.integers(1, 4), st.booleans())  # (gap before it, lines, an end marker)


@given(st.lists(ENTRY, max_size=6), st.integers(0, 12))
def test_a_read_gives_the_events_entry_by_entry_would_in_one_batch_when_it_can(
        shape: list[tuple[int, int, bool]], after_seq: int) -> None:
    entries: list[tuple[int, dict[str, str]]] = []
    seq = 1
    for gap, count, end in shape:
        seq += gap
        texts = [f"line {seq + n}" for n in range(count)]
        entries.append((seq, {"n": str(count), "l": json.dumps(texts),
                              "t": json.dumps([f"ts{seq + n}" for n in range(count)])}))
        seq += count
        if end:
            entries.append((seq, {"end": "1", "status": "completed", "exit_code": "0", "reason": ""}))
            seq += 1
    events, cursor = parse_read(_reply(entries), "0-0", after_seq)
    assert list(events) == _by_entry(entries, after_seq)
    assert cursor == (f"{entries[-1][0]}-0" if entries else "0-0")
    simple = all(not f.get("end") for _, f in entries) and all(g == 0 for g, _, _ in shape[1:])
    if entries and simple and entries[0][0] > after_seq:
        assert isinstance(events, LineBatch)  # no object per line


def test_the_follower_hands_a_batch_that_follows_on_as_it_is_and_trims_one_that_does_not() -> None:
    follow = LogFollow(after_seq=4)
    batch = LineBatch(5, ["e", "f"], ["", ""])
    assert follow.take(batch) is batch and follow.seq == 6
    overlapping = LineBatch(5, ["e", "f", "g"], ["", "", ""])
    assert follow.take(overlapping) == [LogLine(7, "g")] and follow.seq == 7
    gap = follow.take(LineBatch(10, ["j"], [""]))
    assert [e.seq for e in gap] == [8, 10] and "2 earlier lines" in gap[0].text  # type: ignore[union-attr]


def test_entries_read_from_the_stream_stay_json_until_read_and_pass_through_as_json_unchanged() -> None:
    entries = [(3, {"n": "2", "l": json.dumps(["a", "é \"q\""]), "t": json.dumps(["t3", "t4"])}),
               (5, {"n": "1", "l": json.dumps(["c"]), "t": json.dumps(["t5"])})]
    batch, _ = parse_read(_reply(entries), "0-0", 0)
    assert isinstance(batch, LineBatch) and len(batch) == 3 and batch.first == 3
    lines_json, stamps_json = batch.json_columns()  # the entries' own text, joined: nothing decoded
    assert batch._raw is not None
    assert json.loads(lines_json) == ["a", "é \"q\"", "c"] and json.loads(stamps_json) == ["t3", "t4", "t5"]
    assert batch.texts == ["a", "é \"q\"", "c"] and batch._raw is None  # decoded on the first read
    assert batch.json_columns() == (json.dumps(batch.texts), json.dumps(batch.stamps))


def test_an_entry_without_its_count_or_timestamps_is_read_line_by_line_with_empty_stamps() -> None:
    entries = [(1, {"n": "1", "l": '["a"]', "t": '["t1"]'}), (2, {"l": '["b", "c"]'}),
               (4, {"n": "2", "l": '["d", "e"]', "t": '["t4"]'})]
    events, _ = parse_read(_reply(entries), "0-0", 0)
    assert list(events) == [LogLine(1, "a", "t1"), LogLine(2, "b"), LogLine(3, "c"), LogLine(4, "d", "t4"),
                            LogLine(5, "e")]
    batch = LineBatch(4, [], [])
    batch.add_entry(2, '["d", "e"]', '["t4"]')  # stamps shorter than the lines: padded per entry when decoded
    assert batch.stamps == ["t4", ""] and len(batch) == 2
