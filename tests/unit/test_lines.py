from __future__ import annotations

from cloudai.lines import MAX_LINE_BYTES, LineSplitter, archive_line, archived_lines, cut_mark, split_frames
from cloudai.logevents import LogLine

MARK = cut_mark(MAX_LINE_BYTES)


def _joined(pieces: list[str]) -> str:
    """A cut line put back together: every piece but the last ends with the visible cut mark."""
    assert all(p.endswith(MARK) for p in pieces[:-1]) and not pieces[-1].endswith(MARK)
    return "".join(p.removesuffix(MARK) for p in pieces)


def test_lines_split_across_frames_keep_the_first_timestamp() -> None:
    s = LineSplitter()
    assert s.feed(b"hel", "t1") == []
    assert s.feed(b"lo\nwor", "t2") == [("hello", "t1")]
    assert s.feed(b"ld\n", "t3") == [("world", "t2")]
    assert s.close() == []


def test_last_line_without_newline_is_kept() -> None:
    assert list(split_frames([b"t1 a\n", b"t2 b"])) == [("a", "t1"), ("b", "t2")]


def test_carriage_return_progress_collapses_to_last_state() -> None:
    frames = [b"t1 10%\r20%\r30%\r100%\n", b"t2 done\r\n"]
    assert [t for t, _ in split_frames(frames)] == ["100%", "done"]


def test_invalid_utf8_becomes_replacement_characters() -> None:
    assert [t for t, _ in split_frames([b"t \xff\xfeok\xc3\n"])] == ["\ufffd\ufffdok\ufffd"]


def test_one_mib_line_without_newline_is_delivered_in_chunks() -> None:
    payload = b"x" * (1024 * 1024)
    frames = [b"t " + payload[i : i + 16384] for i in range(0, len(payload), 16384)]
    lines = [t for t, _ in split_frames(frames)]
    assert len(lines) == 1024 * 1024 // MAX_LINE_BYTES
    assert _joined(lines) == payload.decode()  # nothing dropped, each cut visible
    assert MARK == " [cloudai: line cut at 64 KiB; it continues on the next line]"


def test_chunks_never_split_a_utf8_character() -> None:
    payload = ("é" * (MAX_LINE_BYTES)).encode()  # 2 bytes each
    lines = [t for t, _ in split_frames([b"t " + payload])]
    assert _joined(lines) == payload.decode() and "\ufffd" not in "".join(lines)


def test_splitting_is_deterministic_for_reattach() -> None:
    frames = [b"t1 a\nb", b"t2 c\n", b"t3 " + b"y" * (MAX_LINE_BYTES + 5), b"t4 \n"]
    assert list(split_frames(frames)) == list(split_frames(frames))


def test_the_line_cap_is_a_setting() -> None:
    lines = [t for t, _ in split_frames([b"t " + b"y" * 2500 + b"\n"], max_line=1024)]
    assert [len(t.removesuffix(cut_mark(1024))) for t in lines] == [1024, 1024, 452]
    assert lines[0].endswith("[cloudai: line cut at 1 KiB; it continues on the next line]")


def test_archive_line_round_trip() -> None:
    archived = [archive_line("hello world", "2026-01-01T00:00:00Z"), archive_line("x", ""), archive_line("", "t")]
    assert archived_lines(archived, 0) == [LogLine(1, "hello world", "2026-01-01T00:00:00Z"), LogLine(2, "x"),
                                           LogLine(3, "", "t")]
    assert archived_lines(archived, 2) == [LogLine(3, "", "t")] and not archived_lines(archived, 3)
    assert archived_lines(archived, 10, first=10) == [LogLine(11, "x"), LogLine(12, "", "t")]  # a chunk at line 10


def test_chunks_give_the_lines_frames_give_whatever_the_grouping() -> None:
    from cloudai.lines import split_chunks

    frames = [b"t1 a\nb", b"t2 c\n", b"t3 ", b"t4 d\r\ne\n", b"t5 " + b"x" * (MAX_LINE_BYTES + 3), b"t6 tail"]
    whole = list(split_frames(frames))
    for size in (1, 2, 3, len(frames)):
        chunks = [frames[i : i + size] for i in range(0, len(frames), size)]
        assert [line for batch in split_chunks(chunks) for line in batch] == whole
    assert all(list(split_chunks([[b"t1 no newline yet"], [b"t2 ..."]]))[:1])  # no empty batch handed on


def test_attach_stream_frames_are_reassembled_across_reads_and_stamped() -> None:
    from cloudai.runtime import _chunked, _demultiplex_reads

    def frame(payload: bytes) -> bytes:
        return bytes([1, 0, 0, 0]) + len(payload).to_bytes(4, "big") + payload

    wire = frame(b"one\n") + frame(b"two\nthr") + frame(b"ee\n")
    reads = [wire[:5], wire[5:17], wire[17:], b""]
    closed: list[bool] = []
    chunks = list(_chunked(_demultiplex_reads(lambda _n: reads.pop(0), lambda: closed.append(True), stamp=True)))
    payloads = [f.partition(b" ")[2] for chunk in chunks for f in chunk]
    assert payloads == [b"one\n", b"two\nthr", b"ee\n"] and closed == [True]
    stamp = chunks[0][0].partition(b" ")[0].decode()
    assert len(stamp) == 30 and stamp.endswith("Z") and stamp[10] == "T"  # Docker's RFC 3339 with nanoseconds


def test_long_lines_are_cut_the_same_whatever_the_frames() -> None:
    from cloudai.lines import split_chunks

    text = ("é" * (MAX_LINE_BYTES // 2 + 10)).encode() + b"x" * (MAX_LINE_BYTES * 2) + b"\nshort\n"
    whole = [t for t, _ in split_frames([b"t " + text])]
    small = [t for t, _ in split_frames([b"t " + text[i : i + 16384] for i in range(0, len(text), 16384)])]
    odd = [t for batch in split_chunks([[b"t " + text[i : i + 7000]] for i in range(0, len(text), 7000)])
           for t, _ in batch]
    assert whole == small == odd and whole[-1] == "short"
    assert all(len(t.removesuffix(MARK).encode()) <= MAX_LINE_BYTES for t in whole)
    assert _joined(whole[:-1]).encode() == text[:-7]


def test_a_read_of_many_lines_splits_as_line_by_line_would() -> None:
    from cloudai.lines import split_chunks

    text = b"a\nbad \xc3\n\xa9 tail\n\xe2\x82\nlast \xf0\x9f\x98\x80\n" * 50 + b"partial"
    per_line = [t for t, _ in split_frames([b"t " + line + b"\n" for line in text.split(b"\n")[:-1]])]
    at_once = [t for batch in split_chunks([[b"t " + text]]) for t, _ in batch]
    assert at_once == per_line + ["partial"]
