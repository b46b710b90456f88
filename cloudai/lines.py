"""How a container's output becomes log lines.

Output is split on ``\\n``; a line longer than the line cap (``CLOUDAI_LOG_MAX_LINE``, default
:data:`MAX_LINE_BYTES`) is cut into pieces of that size, each delivered as its own line, every piece but the last
ending with a visible mark (:data:`CUT_MARK`): nothing is dropped, and a reader sees where a line was cut;
``\\r`` progress updates (tqdm) collapse to the last state of the line; invalid UTF-8 becomes U+FFFD. Archived
lines are ``"<RFC 3339 timestamp> <text>"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from cloudai.logevents import LineBatch

MAX_LINE_BYTES = 64 * 1024
CUT_MARK = " [cloudai: line cut at {size}; it continues on the next line]"


def cut_mark(max_line: int) -> str:
    """What ends a piece of a line that was cut at ``max_line`` bytes."""
    return CUT_MARK.format(size=f"{max_line // 1024} KiB" if max_line % 1024 == 0 else f"{max_line} bytes")


class LineSplitter:
    """Turns Docker log frames into lines, deterministically (a re-attaching worker re-splits the same
    frames into the same lines and skips the ones already published)."""

    def __init__(self, max_line: int = MAX_LINE_BYTES) -> None:
        self.max_line = max_line
        self.mark = cut_mark(max_line)
        self._buf = bytearray()
        self._ts = ""

    def feed(self, payload: bytes, ts: str = "") -> list[tuple[str, str]]:
        if not self._buf and payload.find(b"\n") == len(payload) - 1 and len(payload) <= self.max_line:
            return [(_text(payload[:-1]), ts)]  # the common case: one Docker frame, one whole line
        if not self._buf:
            self._ts = ts
        buf = self._buf
        buf += payload
        out: list[tuple[str, str]] = []
        start = 0  # lines are taken by offset and the buffer trimmed once: a 64 KiB read holds thousands
        last = buf.rfind(b"\n")
        if last > 0 and b"\r" not in buf:
            # many whole lines, none rewritten with \r: split and decode them at C speed when none is too long
            # (a newline byte is never part of a UTF-8 sequence, so decoding the lot equals line by line)
            region = bytes(buf[: last + 1])
            if max(map(len, region.split(b"\n"))) <= self.max_line:
                texts = region.decode("utf-8", errors="replace").split("\n")
                texts.pop()
                out.append((texts[0], self._ts))
                out += [(text, ts) for text in texts[1:]]
                start = last + 1
                self._ts = ts
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            while end - start > self.max_line:  # however the output was cut into frames, the same pieces
                cut = _utf8_boundary(buf, self.max_line, start)
                out.append((_text(bytes(buf[start:cut])) + self.mark, self._ts))
                start = cut
                self._ts = ts
            out.append((_text(bytes(buf[start:end])), self._ts))
            start = end + 1
            self._ts = ts
        while len(buf) - start > self.max_line:  # ">": the byte at the cut must exist to check it
            cut = _utf8_boundary(buf, self.max_line, start)
            out.append((_text(bytes(buf[start:cut])) + self.mark, self._ts))
            start = cut
            self._ts = ts
        del buf[:start]
        return out

    def close(self) -> list[tuple[str, str]]:
        """The last line, when the output did not end with a newline."""
        if not self._buf:
            return []
        rest = (_text(bytes(self._buf)), self._ts)
        self._buf.clear()
        return [rest]


def _utf8_boundary(buf: bytearray, limit: int, start: int = 0) -> int:
    """Where to cut ``limit`` bytes after ``start`` without splitting a UTF-8 character."""
    cut = start + limit
    while cut > start + limit - 4 and cut > start and (buf[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut if cut > start else start + limit


def _text(raw: bytes) -> str:
    if b"\r" in raw:
        # what a terminal would show: the last non-empty state of a \r-updated line
        parts = [p for p in raw.split(b"\r") if p]
        raw = parts[-1] if parts else b""
    return raw.decode("utf-8", errors="replace")


def split_frames(frames: Iterable[bytes], max_line: int = MAX_LINE_BYTES) -> Iterator[tuple[str, str]]:
    """Lines from Docker log frames fetched with ``timestamps=True`` (``b"<ts> <payload>"`` each)."""
    splitter = LineSplitter(max_line)
    for frame in frames:
        ts, _, payload = frame.partition(b" ")
        yield from splitter.feed(payload, ts.decode("ascii", "replace"))
    yield from splitter.close()


def split_chunks(chunks: Iterable[list[bytes]], max_line: int = MAX_LINE_BYTES) -> Iterator[list[tuple[str, str]]]:
    """:func:`split_frames` a list of frames at a time: the lines each list completes (lists without a whole
    line give nothing), then the unterminated rest."""
    splitter = LineSplitter(max_line)
    for chunk in chunks:
        lines: list[tuple[str, str]] = []
        for frame in chunk:
            ts, _, payload = frame.partition(b" ")
            lines += splitter.feed(payload, ts.decode("ascii", "replace"))
        if lines:
            yield lines
    rest = splitter.close()
    if rest:
        yield rest


def archive_line(text: str, ts: str) -> str:
    return archive_lines([(text, ts)])[0]


def archive_lines(lines: list[tuple[str, str]]) -> list[str]:
    """:func:`archive_line` of each ``(text, ts)``, formatted inline (a call per line was a tenth of the worker's
    CPU on a long log)."""
    return [f"{ts or '-'} {text}" for text, ts in lines]


def archived_lines(lines: list[str], after_seq: int, first: int = 1) -> LineBatch:
    """Archived lines (``lines[0]`` is line ``first``) after ``after_seq``, as one batch of columns."""
    skip = max(0, after_seq + 1 - first)
    parts = [line.partition(" ") for line in lines[skip:]]
    return LineBatch(first + skip, [p[2] for p in parts], ["" if p[0] == "-" else p[0] for p in parts])
