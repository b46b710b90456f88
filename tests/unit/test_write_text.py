"""cloudai.cli.render.write_text: every byte reaches a real file however the kernel takes it (short writes, a full
non-blocking pipe), in order after what went through the text layer before; anything else gets ``write``."""

from __future__ import annotations

import io
import os
import threading
import time

from cloudai.cli.render import write_text


def test_a_full_non_blocking_pipe_gets_every_byte_in_order() -> None:
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # as a parent process may leave it: each write takes what fits
    text = "".join(f"line {i} ünïcode\n" for i in range(200_000))
    got: list[bytes] = []

    def slow_reader() -> None:
        while chunk := os.read(read_fd, 7000):
            got.append(chunk)
            time.sleep(0.0001)

    reader = threading.Thread(target=slow_reader)
    reader.start()
    with os.fdopen(write_fd, "w", encoding="utf-8") as out:
        out.write("before\n")  # buffered in the text layer: it must come first
        write_text(out, text)
        out.write("after\n")
    reader.join(30)
    os.close(read_fd)
    assert b"".join(got).decode() == "before\n" + text + "after\n"


def test_not_a_file_is_written_as_usual() -> None:
    out = io.StringIO()
    write_text(out, "a\nb\n")
    assert out.getvalue() == "a\nb\n"


def test_a_character_the_outputs_encoding_lacks_becomes_a_question_mark() -> None:
    read_fd, write_fd = os.pipe()
    with os.fdopen(write_fd, "w", encoding="ascii") as out:
        write_text(out, "naïve\n")
    with os.fdopen(read_fd, "rb") as got:
        assert got.read() == b"na?ve\n"
