"""An attempt's log budget: what is kept, the marker, the summary, and the same result when read again."""

from __future__ import annotations

from cloudai.logbudget import LogBudget, Replay, lines_bytes
from cloudai.logevents import LogLine


def _lines(n: int, text: str = "x" * 99) -> list[tuple[str, str]]:
    return [(f"{text}", f"t{i}") for i in range(n)]


def test_lines_within_the_budget_are_kept_then_one_marker_then_nothing() -> None:
    budget = LogBudget(1000)
    assert budget.admit(_lines(5)) == _lines(5)  # 500 bytes (a newline each)
    kept = budget.admit(_lines(10))
    assert kept[:5] == _lines(5) and len(kept) == 6 and budget.exceeded
    assert kept[5] == ("[cloudai] log budget of 1000 bytes reached (CLOUDAI_LOG_MAX_BYTES): further output is "
                       "not kept; the task keeps running", "t5")
    assert budget.admit(_lines(3)) == []
    assert (budget.seen, budget.used, budget.dropped_lines, budget.dropped_bytes) == (18, 1000, 8, 800)
    assert budget.summary() == ("[cloudai] 800 bytes of further output in 8 lines not kept: the log budget is "
                                "1000 bytes")


def test_no_budget_keeps_everything_and_utf8_is_counted_in_bytes() -> None:
    budget = LogBudget(0)
    assert budget.admit(_lines(10_000)) == _lines(10_000) and budget.summary() is None
    assert lines_bytes(["é", "ab"]) == 3 + 3


def test_the_stop_policy_says_so() -> None:
    budget = LogBudget(2 * 1024 * 1024, stop=True)
    assert budget.marker.startswith("[cloudai] log budget of 2 MiB reached") and "the task is stopped" in budget.marker


def test_a_reattaching_worker_resumes_a_spent_budget_from_the_marker() -> None:
    first = LogBudget(1000)
    kept = first.admit(_lines(5)) + first.admit(_lines(10))
    again = LogBudget(1000)
    again.resume(len(kept), LogLine(len(kept), kept[-1][0]))
    assert again.exceeded and again.seen == 10  # the marker stands for container line 11, the first not kept
    assert again.admit(_lines(10)) == [] and again.dropped_lines == 10
    fresh = LogBudget(1000)
    fresh.resume(3, LogLine(3, "an ordinary line"))
    assert not fresh.exceeded and fresh.seen == 3


def test_reading_the_output_again_maps_each_line_to_the_same_seq() -> None:
    output = [(f"line {n} " + "y" * (n % 50), "") for n in range(1, 200)]
    live = LogBudget(3000)
    start = LogBudget(3000)
    published = [text for text, _ in live.admit(output[:40]) + live.admit(output[40:])]
    replay = Replay(start, base=7)
    again = list(replay.lines(output))
    assert [seq for _n, seq, _t, _ts in again] == list(range(8, 8 + len(published)))
    assert [text for _n, _seq, text, _ts in again] == published
    assert replay.budget.dropped_bytes == live.dropped_bytes and replay.budget.seen == live.seen
