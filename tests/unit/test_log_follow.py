"""The log-following state machine without I/O: the requests it makes and the batches it hands over."""

from __future__ import annotations

from typing import Any

import pytest

from cloudai import logfollow as logs
from cloudai.errors import RedisUnavailable
from cloudai.lines import archived_lines
from cloudai.logevents import LineBatch, LogEnd, LogLine


def test_history_then_end_skipping_duplicates_and_noting_a_trimmed_gap() -> None:
    steps = logs.LogFollow(after_seq=2).steps()
    assert next(steps) == ("cursor", 2)
    assert steps.send("1-0") == ("read", ("1-0", 2, None))  # the first read does not wait
    assert steps.send(([LogLine(2, "dup"), LogLine(3, "c"), LogLine(7, "g")], "7-0")) == ("emit", [LogLine(3, "c")])
    assert steps.send(None) == ("archive", 3)  # lines 4-6: the archive first
    kind, batch = steps.send(None)  # it has none of them (yet)
    assert kind == "emit"
    assert [e.seq for e in batch] == [4, 7] and "3 earlier lines were trimmed" in batch[0].text
    assert steps.send(None) == ("read", ("7-0", 7, logs.BLOCK_MS))
    end = LogEnd("completed", 0)
    assert steps.send(([LogLine(8, "h"), end], "9-0")) == ("emit", [LogLine(8, "h"), end])
    with pytest.raises(StopIteration):
        steps.send(None)


def test_without_follow_a_running_task_stops_after_the_history() -> None:
    steps = logs.LogFollow(follow=False).steps()
    assert next(steps) == ("cursor", 0)
    assert steps.send("0-0") == ("read", ("0-0", 0, None))
    assert steps.send(([LogLine(1, "a")], "1-0")) == ("emit", [LogLine(1, "a")])
    assert steps.send(None)[0] == "read"
    assert steps.send(([], "1-0")) == ("end_of_task", None)  # nothing new: ask the store
    with pytest.raises(StopIteration):
        steps.send(None)  # not ended


def test_an_expired_stream_is_read_from_the_archive() -> None:
    steps = logs.LogFollow(follow=False).steps()
    next(steps)
    steps.send("0-0")
    assert steps.send(([], "0-0")) == ("end_of_task", None)
    end = LogEnd("failed", 3)
    assert steps.send(end) == ("exists", None)
    assert steps.send(False) == ("archive", 0)  # the store's chunk after line 0
    kind, batch = steps.send(archived_lines(["2026-01-01T00:00:00Z one", "- two"], 0))
    assert kind == "emit" and isinstance(batch, LineBatch)  # one batch of columns
    assert batch == [LogLine(1, "one", "2026-01-01T00:00:00Z"), LogLine(2, "two")]
    assert steps.send(None) == ("archive", 2)  # the next chunk, until there is none
    assert steps.send(None) == ("emit", [end])


def test_following_a_log_that_expired_long_ago_asks_the_store_at_once() -> None:
    """`logs -f` of a task that ended long ago: no blocking read and no idle wait before the archive."""
    steps = logs.LogFollow(follow=True).steps()
    next(steps)
    assert steps.send("0-0") == ("read", ("0-0", 0, None))
    assert steps.send(([], "0-0")) == ("emit", [])  # a viewer may look at its keys
    assert steps.send(None) == ("end_of_task", None)  # at once, not after IDLE_CHECK_S
    end = LogEnd("completed", 0)
    assert steps.send(end) == ("exists", None)
    assert steps.send(False) == ("archive", 0)
    assert steps.send(archived_lines(["- only"], 0)) == ("emit", [LogLine(1, "only")])
    assert steps.send(None) == ("archive", 1)
    assert steps.send(None) == ("emit", [end])


def test_a_task_that_has_not_printed_yet_is_then_followed_with_blocking_reads() -> None:
    steps = logs.LogFollow(follow=True).steps()
    next(steps)
    steps.send("0-0")
    steps.send(([], "0-0"))
    assert steps.send(None) == ("end_of_task", None)
    assert steps.send(None) == ("read", ("0-0", 0, logs.BLOCK_MS))  # running: wait for lines from now on


def test_redis_errors_wait_and_resume_then_give_up(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    steps = logs.LogFollow(reconnect_for_s=10).steps()
    next(steps)
    error = RedisUnavailable("redis://:pw@h", "down")
    kind, arg = steps.throw(error)
    assert kind == "wait" and arg[0] is error and arg[1] == 1.0
    assert steps.send(None) == ("cursor", 0)  # tries again from where it was
    clock[0] += 5
    again: Any = steps.throw(error)
    assert again[0] == "wait"
    steps.send(None)
    clock[0] += 6  # broken for 11 s in a row: more than reconnect_for_s
    with pytest.raises(RedisUnavailable):
        steps.throw(error)


def test_a_long_archive_goes_out_in_batches_then_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "ARCHIVE_BATCH_LINES", 2)
    steps = logs.LogFollow(after_seq=1, follow=False).steps()
    steps.send(None)  # the cursor for after_seq=1 is asked first
    steps.send("1-0")
    steps.send(([], "1-0"))
    end = LogEnd("completed", 0)
    steps.send(end)
    assert steps.send(False) == ("archive", 1)
    first = steps.send(archived_lines([f"- l{n}" for n in range(1, 6)], 1))
    assert first == ("emit", [LogLine(2, "l2"), LogLine(3, "l3")])
    assert steps.send(None) == ("emit", [LogLine(4, "l4"), LogLine(5, "l5")])
    assert steps.send(None) == ("archive", 5)
    assert steps.send(archived_lines(["- l9"], 8, first=9)) == ("emit", [LogLine(6, "[cloudai] 3 lines are missing "
                                                                             "from the archive")])
    assert steps.send(None) == ("emit", [LogLine(9, "l9")])  # a hole in the archive is said, not hidden
    assert steps.send(None) == ("archive", 9)
    assert steps.send(None) == ("emit", [end])


def test_a_stream_trimmed_past_the_follower_is_joined_from_the_archive() -> None:
    """A late follower: the stream's window starts at line 6; lines 1-5 come from the archive's chunks, then the
    stream, with no gap and no duplicate."""
    steps = logs.LogFollow(follow=True).steps()
    next(steps)
    steps.send("0-0")
    stream = LineBatch(6, ["f", "g"], ["", ""])
    assert steps.send((stream, "6-0")) == ("archive", 0)
    assert steps.send(archived_lines(["- a", "- b", "- c"], 0)) == ("emit", archived_lines(["- a", "- b", "- c"], 0))
    assert steps.send(None) == ("archive", 3)
    # the archive's next chunk overlaps the stream: only up to line 5 from it
    assert steps.send(archived_lines(["- d", "- e", "- f"], 3, first=4)) == ("emit", [LogLine(4, "d"), LogLine(5, "e")])
    assert steps.send(None) == ("emit", stream)
    assert steps.send(None)[0] == "read"


def test_an_archive_that_lags_the_trimmed_stream_leaves_a_note() -> None:
    steps = logs.LogFollow(follow=True).steps()
    next(steps)
    steps.send("0-0")
    assert steps.send((LineBatch(6, ["f"], [""]), "6-0")) == ("archive", 0)
    assert steps.send(archived_lines(["- a", "- b"], 0)) == ("emit", [LogLine(1, "a"), LogLine(2, "b")])
    assert steps.send(None) == ("archive", 2)
    kind, batch = steps.send(None)  # nothing more archived yet
    assert kind == "emit" and "3 earlier lines were trimmed" in batch[0].text and batch[1] == LogLine(6, "f")


def test_a_hole_inside_the_stream_is_filled_from_the_archive() -> None:
    """A Redis failover lost entries the old primary had not replicated (lines 3-4) while the writer went on
    with line 5: the follower reads them from the archive (the worker archived every line), then the stream
    again, no gap, no duplicate."""
    steps = logs.LogFollow(follow=False).steps()
    next(steps)
    steps.send("0-0")
    read = [LogLine(1, "a"), LogLine(2, "b"), LogLine(5, "e"), LogLine(6, "f")]
    assert steps.send((read, "6-0")) == ("emit", [LogLine(1, "a"), LogLine(2, "b")])
    assert steps.send(None) == ("archive", 2)
    archived = archived_lines(["- c", "- d", "- e"], 2, first=3)
    assert steps.send(archived) == ("emit", [LogLine(3, "c"), LogLine(4, "d")])  # up to the stream's next line
    assert steps.send(None) == ("emit", [LogLine(5, "e"), LogLine(6, "f")])
    assert steps.send(None)[0] == "read"
