"""Data in, results out, without services: the output and upload paths users give (checked at submit, exit 2),
the ignore rules of an upload, packing a directory, and the archive checks the master and the worker apply
(tar bombs, `..` and absolute names, links leading out, special files) before anything is unpacked."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from cloudai.errors import ValidationError
from cloudai.ignorefile import IgnoreRules, parse_rules
from cloudai.outputs import MAX_OUTPUTS, parse_outputs
from cloudai.submission import build_request
from cloudai.uploads import MAX_MEMBERS, inspect_upload, pack, parse_upload, placement_archive

MiB = 1024 * 1024


@pytest.mark.parametrize("path, words", [
    ("/proc", "not /, /proc, /sys or /dev"), ("/proc/self/environ", "not /, /proc"), ("/sys/kernel", "not /"),
    ("/dev/sda", "not /"), ("/", "not /"), ("//proc", "not /"), ("/out/../proc", "may not hold '..'"),
    ("out", "must be absolute"), ("", "use an absolute path"), ("/out\nx", "control characters"),
])
def test_outputs_outside_the_tasks_own_files_are_refused_at_submit(path: str, words: str) -> None:
    with pytest.raises(ValidationError) as refused:
        build_request(image="busybox", outputs=[path])
    assert words in str(refused.value) and refused.value.exit_code == 2


def test_outputs_are_normalised_counted_and_never_nested() -> None:
    assert parse_outputs(["/out/", "/work/./model.pt"]) == ["/out", "/work/model.pt"]
    for bad in (["/out", "/out/ckpt"], ["/a", "/a"], [f"/o{i}" for i in range(MAX_OUTPUTS + 1)]):
        with pytest.raises(ValidationError):
            parse_outputs(bad)


def test_an_upload_goes_to_workspace_unless_a_container_path_is_given() -> None:
    assert parse_upload(".") == (".", "/workspace")
    assert parse_upload("./src:/code") == ("./src", "/code")
    assert parse_upload("C:dir") == ("C:dir", "/workspace")  # a colon in a local name is kept
    for bad in ("src:/proc/x", "src:/", "src:/a/../b", ":/code"):
        with pytest.raises(ValidationError):
            parse_upload(bad)


def test_ignore_rules_read_as_git_reads_them() -> None:
    rules = IgnoreRules(parse_rules("# comment\n\n*.log\nbuild/\n/data\ndocs/**/*.tmp\n!keep.log\nsub/name\n"))
    cases = {("a.log", False): True, ("x/y/b.log", False): True, ("keep.log", False): False,
             ("build", True): True, ("build", False): False, ("src/build", True): True, ("data", True): True,
             ("src/data", True): False, ("docs/a/b/c.tmp", False): True, ("docs/c.tmp", False): True,
             ("sub/name", False): True, ("x/sub/name", False): False, (".git", True): True,
             ("train.py", False): False}
    assert {case: rules.ignored(*case) for case in cases} == cases


def test_packing_leaves_out_what_cloudaiignore_names_and_keeps_links_inside(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "train.py").write_text("print('hi')\n")
    (tmp_path / "sub" / "data.csv").write_text("1,2\n")
    (tmp_path / "big.bin").write_bytes(b"x" * 1000)
    (tmp_path / ".gitignore").write_text("*.csv\n")  # .cloudaiignore wins over it
    (tmp_path / ".cloudaiignore").write_text("*.bin\n")
    (tmp_path / "link").symlink_to("sub/data.csv")
    packed = pack(str(tmp_path), MiB)
    with tarfile.open(fileobj=packed.file) as tar:
        names = {m.name: m for m in tar}
    assert sorted(names) == [".cloudaiignore", ".gitignore", "link", "sub", "sub/data.csv", "train.py"]
    assert names["link"].issym() and names["link"].linkname == "sub/data.csv"
    assert (packed.ignore_file, packed.skipped, packed.files) == (".cloudaiignore", 1, 4)


@pytest.mark.parametrize("make, words", [
    (lambda d: (d / "f").write_bytes(b"x" * 2000), "holds more than 1000 B of files (CLOUDAI_UPLOAD_MAX_BYTES)"),
    (lambda d: (d / "l").symlink_to("/etc/passwd"), "outside the directory"),
    (lambda d: (d / "l").symlink_to("../.."), "outside the directory"),
    (lambda d: os.mkfifo(d / "p"), "device, pipe or socket"),
])
def test_packing_refuses_what_cant_be_uploaded_before_anything_is_sent(tmp_path: Path, make, words: str) -> None:  # type: ignore[no-untyped-def]
    make(tmp_path)
    with pytest.raises(ValidationError) as refused:
        pack(str(tmp_path), 1000)
    assert words in str(refused.value) and refused.value.exit_code == 2


class Zeros(io.RawIOBase):
    """``size`` zero bytes, never held in memory (a tar bomb's content)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def archive(*entries: tarfile.TarInfo, data: dict[str, bytes] | None = None,
            fmt: int = tarfile.PAX_FORMAT) -> io.BytesIO:
    """A hand-made tar.gz of ``entries`` (file contents from ``data``, else zeros of the entry's size)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", format=fmt) as tar:
        for info in entries:
            if info.isreg():
                content = (data or {}).get(info.name)
                tar.addfile(info, io.BytesIO(content) if content is not None else io.BufferedReader(Zeros(info.size)))
            else:
                tar.addfile(info)
    out.seek(0)
    return out


def entry(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, link
    return info


HOSTILE = [
    ("a tar bomb (64 MiB of zeros, 64 KiB packed)", [entry("zeros", 64 * MiB)], "unpacks to more than 1 MiB"),
    ("many files, together past the cap", [entry(f"f{i}", 300_000) for i in range(5)], "unpacks to more than 1 MiB"),
    ("a member climbing out", [entry("../../etc/cron.d/x", 4)], "climbs out with '..'"),
    ("a member climbing out inside", [entry("a/../../x", 4)], "climbs out with '..'"),
    ("an absolute member", [entry("/etc/passwd", 4)], "absolute or empty name"),
    ("a link leading out", [entry("l", kind=tarfile.SYMTYPE, link="../../etc")], "leading outside it"),
    ("an absolute link", [entry("l", kind=tarfile.SYMTYPE, link="/etc/shadow")], "to an absolute path"),
    ("a link through a link", [entry("l2", kind=tarfile.SYMTYPE, link="."),
                               entry("l1", kind=tarfile.SYMTYPE, link="l2/../x")], "passes through another link"),
    ("a file written through a link", [entry("d", kind=tarfile.SYMTYPE, link="sub"), entry("d/x", 1)],
     "inside the link 'd'"),
    ("a hard link", [entry("a", 1), entry("b", kind=tarfile.LNKTYPE, link="a")], "a hard link"),
    ("a device", [entry("null", kind=tarfile.CHRTYPE)], "a device or pipe"),
    ("a pipe", [entry("p", kind=tarfile.FIFOTYPE)], "a device or pipe"),
]


@pytest.mark.parametrize("what, entries, words", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_archives_are_refused_without_unpacking_them(what: str, entries: list[tarfile.TarInfo],
                                                             words: str) -> None:
    with pytest.raises(ValidationError) as refused:
        inspect_upload(archive(*entries), MiB)
    assert words in str(refused.value) and refused.value.exit_code == 2, str(refused.value)


def test_an_archive_with_a_giant_header_or_too_many_entries_or_no_archive_at_all_is_refused() -> None:
    giant = archive(entry("n" * (2 * MiB), 1), fmt=tarfile.GNU_FORMAT)  # a 2 MiB long-name header
    with pytest.raises(ValidationError, match="header of more than 1 MiB"):
        inspect_upload(giant, 100 * MiB)
    crowd = archive(*[entry(f"d{i}", kind=tarfile.DIRTYPE) for i in range(MAX_MEMBERS + 1)])
    with pytest.raises(ValidationError, match=f"more than {MAX_MEMBERS} entries"):
        inspect_upload(crowd, 100 * MiB)
    for junk in (b"", b"not a gzip stream", b"\x1f\x8b\x08\x00garbage"):
        with pytest.raises(ValidationError, match="not a readable tar.gz"):
            inspect_upload(io.BytesIO(junk), MiB)


def test_the_worker_places_checked_entries_below_the_target_owned_by_the_task_user() -> None:
    setuid = entry("run.sh", 3)
    setuid.mode = 0o4755
    source = archive(entry("src", kind=tarfile.DIRTYPE), entry("src/a.py", 2), setuid,
                     entry("lnk", kind=tarfile.SYMTYPE, link="src/a.py"), data={"src/a.py": b"hi", "run.sh": b"#!x"})
    placed, summary = placement_archive(source, "/workspace/job", (1000, 1000), MiB)
    with tarfile.open(fileobj=placed) as tar:
        members = {m.name: m for m in tar}
        content = tar.extractfile(members["workspace/job/src/a.py"]).read()  # type: ignore[union-attr]
    assert sorted(members) == ["workspace/job", "workspace/job/lnk", "workspace/job/run.sh", "workspace/job/src",
                               "workspace/job/src/a.py"]
    assert {(m.uid, m.gid) for m in members.values()} == {(1000, 1000)}
    assert members["workspace/job/run.sh"].mode == 0o755  # no set-uid bit survives
    assert content == b"hi" and (summary.files, summary.dirs) == (2, 1)
