"""LineBatch: lines as two columns that read as a sequence of LogLine; stream reads come as one when they can,
and give the same events as reading them entry by entry."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloudai import logevents
from cloudai.logevents import LineBatch, LogEnd, LogEvent, LogLine, line_columns
from cloudai.logfollow import LogFollow
from cloudai.logs import parse_read
from cloudai.server.logstream import sse_events


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


def _entries_read(*entries: tuple[int, list[str], list[str]]) -> LineBatch:
    batch, _ = parse_read(_reply([(seq, {"n": str(len(texts)), "l": json.dumps(texts), "t": json.dumps(stamps)})
                                  for seq, texts, stamps in entries]), "0-0", 0)
    assert isinstance(batch, LineBatch)
    return batch


def test_the_masters_json_sse_passes_the_entries_arrays_on_without_decoding_them(monkeypatch: Any) -> None:
    entries = ((3, ["a", 'é "q"'], ["t3", "t4"]), (5, ["c"], ["t5"]))
    expected = sse_events(LineBatch(3, ["a", 'é "q"', "c"], ["t3", "t4", "t5"]), True, True)
    with monkeypatch.context() as patched:
        patched.setattr(logevents, "entry_columns", lambda *a: pytest.fail("decoded"))
        batch = _entries_read(*entries)
        assert len(batch) == 3 and batch.first == 3
        got = sse_events(batch, True, True)
    assert got.startswith("event: lines\nid: 5\ndata: {") and got.count("\n") == 4
    assert json.loads(got.split("data: ")[1]) == json.loads(expected.split("data: ")[1])
    assert batch.texts == ["a", 'é "q"', "c"] and batch.stamps == ["t3", "t4", "t5"]  # decoded when read
    assert batch == [LogLine(3, "a", "t3"), LogLine(4, 'é "q"', "t4"), LogLine(5, "c", "t5")]


def test_the_json_sse_leaves_the_timestamps_out_unless_asked_and_the_client_reads_both() -> None:
    from cloudai.cli.remote import event_lines, parse_sse

    decoded = LineBatch(3, ["a", "b"], ["t3", "t4"])
    for batch in (decoded, _entries_read((3, ["a", "b"], ["t3", "t4"]))):  # encoded, and passed through
        for timestamps in (True, False):
            (event,) = parse_sse([sse_events(batch, timestamps, True).encode()])
            assert ('"ts"' in event.data[0]) is timestamps
            got = event_lines(event)
            assert (got.first, got.texts, got.stamps) == (3, ["a", "b"], ["t3", "t4"] if timestamps else ["", ""])


def test_a_batch_of_decoded_lines_and_stored_entries_reads_and_encodes_as_one() -> None:
    batch = LineBatch(5, ["x"], ["tx"])
    batch.add_entry(2, '["y", "z"]', '["ty", "tz"]')
    batch.add_entry(0, "[ ]", "[]")
    assert len(batch) == 3
    lines_json, stamps_json = batch.json_columns()
    assert json.loads(lines_json) == ["x", "y", "z"] and json.loads(stamps_json) == ["tx", "ty", "tz"]
    assert batch[1:] == [LogLine(6, "y", "ty"), LogLine(7, "z", "tz")]


def test_stored_entries_not_as_the_writer_writes_them_are_decoded_to_their_counts() -> None:
    batch = LineBatch(1, [], [])
    batch.add_entry(2, '["a"]', "[]")  # fewer lines than its count says, and no timestamps
    batch.add_entry(1, '["c"\n]', '["t3"]')  # valid JSON, but not one line: never passed into SSE as it is
    lines_json, stamps_json = batch.json_columns()
    assert "\n" not in lines_json and json.loads(lines_json) == ["a", "", "c"]
    assert batch.stamps == ["", "", "t3"] and len(batch) == 3 == len(list(batch))


def test_an_entry_without_its_count_or_timestamps_is_read_line_by_line_with_empty_stamps() -> None:
    entries = [(1, {"n": "1", "l": '["a"]', "t": '["t1"]'}), (2, {"l": '["b", "c"]'}),
               (4, {"n": "2", "l": '["d", "e"]', "t": '["t4"]'})]
    events, _ = parse_read(_reply(entries), "0-0", 0)
    assert list(events) == [LogLine(1, "a", "t1"), LogLine(2, "b"), LogLine(3, "c"), LogLine(4, "d", "t4"),
                            LogLine(5, "e")]


def test_the_api_client_keeps_a_json_batch_with_fewer_timestamps_than_lines_aligned() -> None:
    from cloudai.cli.remote import SSEvent, event_lines

    batch = event_lines(SSEvent("lines", "3", ['{"first": 1, "lines": ["a", "b", "c"], "ts": ["t1"]}']))
    assert list(batch) == [LogLine(1, "a", "t1"), LogLine(2, "b"), LogLine(3, "c")]
