"""Data in, results out (issue 24, items 2 and 3) on real processes: a `cloudai server`, a `cloudai worker start`
with a read-only dataset volume, real containers, the SQLite store and the directory artifact store they share
(beside the store's file), and the CLI in API mode with two users' tokens.

A training job gets its code by `--upload`, reads its dataset from a read-only volume, fails to write it, and
writes a checkpoint to `--output`; its user lists it (`cloudai artifacts`) and downloads the same bytes through
the master (`cloudai cp`, checked by size and SHA-256, resumed after an interruption); another user gets 404.
Hostile rows: outputs on /proc, a link to /etc/shadow in an output directory, an output past the worker's cap, a
tar bomb and a `../` member sent to the API directly, an upload past the cap: each is exit 2 or a clear reason,
and nothing escapes."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cloudai.models import TaskStatus
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.helpers import ROOT, ServerProc, cloudai, entrypoint_image, wait_ended, wait_for
from tests.services import TEST_IMAGE

S = TaskStatus
MiB = 1024 * 1024
OUTPUT_CAP = "1m"  # the worker's CLOUDAI_OUTPUT_MAX_BYTES in these tests
UPLOAD_CAP = "1m"  # the master's (and the CLI's) CLOUDAI_UPLOAD_MAX_BYTES


@pytest.fixture
def server(settings: Settings, store: SQLiteStore, tmp_path: Path) -> Iterator[ServerProc]:
    """The master, with a small upload cap."""
    proc = ServerProc(settings, store, tmp_path, env={"CLOUDAI_UPLOAD_MAX_BYTES": UPLOAD_CAP}).start()
    yield proc
    proc.stop()


def cli(env: dict[str, str], *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cloudai(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_training_job_gets_code_in_and_its_checkpoint_back_through_the_master(
    server: ServerProc, settings: Settings, store: SQLiteStore, workers, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    data = tmp_path / "datasets"
    data.mkdir()
    (data / "train.txt").write_text("60000 images\n")
    workers(None, "--cpus", "4", "--memory", "8g", "--gpus", "none", "--volume", f"data={data}:ro",
            env={"CLOUDAI_OUTPUT_MAX_BYTES": OUTPUT_CAP})
    code = tmp_path / "project"
    (code / "runs").mkdir(parents=True)
    (code / "train.sh").write_text(
        "pwd; ls\n"
        "cat /data/train.txt\n"
        "(echo x > /data/train.txt) 2>/dev/null || echo dataset-is-read-only\n"
        "mkdir -p ckpt/epoch1 && head -c 300000 /dev/urandom > ckpt/epoch1/model.ckpt\n"
        "echo done > ckpt/log.txt\n"
        "sha256sum ckpt/epoch1/model.ckpt\n")
    (code / "runs" / "old.log").write_text("left behind\n")
    (code / ".cloudaiignore").write_text("runs/\n")
    ana = server.cli_env(server.token("ana"))
    bo = server.cli_env(server.token("bo"))

    # an image with an ENTRYPOINT (it runs first), as a non-root user: the upload is theirs, in /workspace
    job = cli(ana, "submit", "-f", "-u", "1000:1000", "--mount", "data:/data:ro", "--output", "/workspace/ckpt",
              "--upload", f"{code}", entrypoint_image(), "--", "sh", "train.sh")
    assert job.returncode == 0, job.stdout + job.stderr
    assert "upload: " in job.stderr and "1 left out by .cloudaiignore" in job.stderr, job.stderr
    lines = job.stdout.splitlines()
    assert lines[:5] == ["entrypoint-ran", "/workspace", "train.sh", "60000 images", "dataset-is-read-only"], lines
    digest = lines[5].split()[0]
    assert any("[cloudai] outputs: 2 files" in ln for ln in lines), lines
    task_id = store.list_tasks(user_id="ana", limit=1)[0].task_id
    assert (data / "train.txt").read_text() == "60000 images\n"

    listed = cli(ana, "artifacts", task_id, "--json")
    assert listed.returncode == 0, listed.stderr
    files = {a["path"]: a for a in json.loads(listed.stdout)}
    assert sorted(files) == ["/workspace/ckpt/epoch1/model.ckpt", "/workspace/ckpt/log.txt"]
    model = "/workspace/ckpt/epoch1/model.ckpt"
    assert (files[model]["size"], files[model]["sha256"]) == (300000, digest)
    table = cli(ana, "artifacts", task_id)
    assert "/workspace/ckpt/epoch1/model.ckpt" in table.stdout and digest in table.stdout

    # the same bytes back, through the master, checked by size and digest
    dest = tmp_path / "model.ckpt"
    got = cli(ana, "cp", f"{task_id}:/workspace/ckpt/epoch1/model.ckpt", str(dest))
    assert got.returncode == 0, got.stderr
    assert dest.stat().st_size == 300000 and sha256(dest) == digest
    tree = cli(ana, "cp", f"{task_id}:/workspace/ckpt", str(tmp_path / "ckpt"))
    assert tree.returncode == 0, tree.stderr
    assert sha256(tmp_path / "ckpt" / "epoch1" / "model.ckpt") == digest
    assert (tmp_path / "ckpt" / "log.txt").read_text() == "done\n"

    # an interrupted download resumes where it stopped; a part that is not the file's start is caught and removed
    whole = dest.read_bytes()
    again = tmp_path / "again.ckpt"
    Path(str(again) + ".cloudai-part").write_bytes(whole[:100000])
    resumed = cli(ana, "cp", f"{task_id}:/workspace/ckpt/epoch1/model.ckpt", str(again))
    assert resumed.returncode == 0 and "resumed at" in resumed.stderr, resumed.stderr
    assert again.read_bytes() == whole
    wrong = tmp_path / "wrong.ckpt"
    Path(str(wrong) + ".cloudai-part").write_bytes(b"\0" * 100000)
    caught = cli(ana, "cp", f"{task_id}:/workspace/ckpt/epoch1/model.ckpt", str(wrong))
    assert caught.returncode == 1 and "does not match what was stored" in caught.stderr, caught.stderr
    assert not wrong.exists() and not Path(str(wrong) + ".cloudai-part").exists()
    assert cli(ana, "cp", f"{task_id}:/workspace/ckpt/epoch1/model.ckpt", str(wrong)).returncode == 0
    assert wrong.read_bytes() == whole

    # another user: 404, exactly as for a task that does not exist
    for args in (("artifacts", task_id), ("cp", f"{task_id}:{model}", str(tmp_path / "bo"))):
        refused = cli(bo, *args)
        assert refused.returncode == 122 and f"no task '{task_id}'" in refused.stderr, refused.stderr
    assert not (tmp_path / "bo").exists()
    raw = httpx.get(f"{server.url}/v1/tasks/{task_id}/artifacts/workspace/ckpt/epoch1/model.ckpt",
                    headers={"Authorization": f"Bearer {bo['CLOUDAI_TOKEN']}"})
    assert raw.status_code == 404 and raw.json()["error"]["type"] == "TaskNotFound"

    # the web page links them (signed in by the browser session)
    with httpx.Client(base_url=server.url) as browser:
        assert browser.post("/login", data={"token": ana["CLOUDAI_TOKEN"]}).status_code in (200, 303)
        page = browser.get(f"/tasks/{task_id}").text
        href = f"/v1/tasks/{task_id}/artifacts/workspace/ckpt/epoch1/model.ckpt"
        assert href in page
        assert browser.get(href).content == whole
        ranged = browser.get(href, headers={"Range": "bytes=299990-"})
        assert (ranged.status_code, ranged.content) == (206, whole[299990:])

    # only its owner removes them (freeing their quota); then nothing is listed, and the upload is gone too
    assert cli(bo, "artifacts", "--delete", task_id).returncode == 122
    removed = cli(ana, "artifacts", "--delete", task_id)
    assert removed.returncode == 0 and "stored files removed" in removed.stderr + removed.stdout, removed.stderr
    assert json.loads(cli(ana, "artifacts", task_id, "--json").stdout) == []
    assert not list((tmp_path / "artifacts").rglob(f"*{task_id}*"))


def test_hostile_outputs_and_uploads_give_exit_2_or_a_clear_reason_and_nothing_escapes(
    server: ServerProc, settings: Settings, store: SQLiteStore, workers, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    workers(env={"CLOUDAI_OUTPUT_MAX_BYTES": OUTPUT_CAP})
    ana = server.cli_env(server.token("ana"), CLOUDAI_UPLOAD_MAX_BYTES=UPLOAD_CAP)
    before = len(store.list_tasks(limit=None))

    # outputs on the kernel's files: refused at submit, nothing recorded
    for path in ("/proc", "/proc/self/environ", "/sys/fs", "/dev/sda", "/"):
        refused = cli(ana, "submit", "--output", path, TEST_IMAGE, "true")
        assert refused.returncode == 2 and "not /, /proc, /sys or /dev" in refused.stderr, (path, refused.stderr)
    assert len(store.list_tasks(limit=None)) == before

    # a link to /etc/shadow (and a pipe) in an output directory: not followed, not stored; the rest is kept.
    # An output past the worker's cap is not stored (each output whole or not at all); the ones that fit are.
    script = ("mkdir -p /out /big && echo ok > /out/ok.txt && ln -s /etc/shadow /out/shadow && mkfifo /out/pipe "
              "&& head -c 3000000 /dev/zero > /big/blob && echo small > /big/small && echo kept > /small")
    hostile = cli(ana, "submit", "-f", "--output", "/out", "--output", "/big", "--output", "/small",
                  TEST_IMAGE, "sh", "-c", script)
    assert hostile.returncode == 0, hostile.stdout + hostile.stderr
    task = store.list_tasks(user_id="ana", limit=1)[0]
    assert task.status == S.COMPLETED and task.error is not None
    reason = task.error.message
    assert "output /out: links and special files are not followed or stored: /out/pipe (special file), " \
           "/out/shadow (link)" in reason, reason
    assert "output /big not stored: it passes the output cap of 1 MiB per task (CLOUDAI_OUTPUT_MAX_BYTES)" in reason
    assert "output /big not stored" in hostile.stdout  # in the log and in the final line
    listed = json.loads(cli(ana, "artifacts", task.task_id, "--json").stdout)
    assert sorted(a["path"] for a in listed) == ["/out/ok.txt", "/small"]
    shadow = cli(ana, "cp", f"{task.task_id}:/out/shadow", str(tmp_path / "shadow"))
    assert shadow.returncode == 122 and not (tmp_path / "shadow").exists()
    status = cli(ana, "status", task.task_id)
    assert "reason" in status.stdout and "/big not stored" in status.stdout

    # uploads: past the cap, refused by the CLI before anything is sent
    big = tmp_path / "big"
    big.mkdir()
    (big / "data.bin").write_bytes(b"x" * (2 * MiB))
    refused = cli(ana, "submit", "--upload", str(big), TEST_IMAGE, "true")
    assert refused.returncode == 2 and "CLOUDAI_UPLOAD_MAX_BYTES" in refused.stderr, refused.stderr
    assert len(store.list_tasks(limit=None)) == before + 1

    # hand-made archives sent to the API directly: a tar bomb (64 MiB of zeros in 64 KiB) and a `../` member
    token = {"Authorization": f"Bearer {ana['CLOUDAI_TOKEN']}"}
    spec = json.dumps({"image": TEST_IMAGE, "command": ["true"]})
    for archive, words in ((tar_gz("zeros", 64 * MiB), "unpacks to more than 1 MiB"),
                           (tar_gz("../../../etc/cron.d/evil", 10), "climbs out with '..'")):
        answer = httpx.post(f"{server.url}/v1/tasks", headers=token, data={"spec": spec},
                            files={"upload": ("upload.tar.gz", archive, "application/gzip")}, timeout=60)
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert error["exit_code"] == 2 and words in error["message"], error
    assert len(store.list_tasks(limit=None)) == before + 1
    stored = tmp_path / "artifacts"
    assert not any(p.name == "input" for p in stored.rglob("*")), "no refused upload was stored"
    # a body past the cap is cut off at the door (413, exit 2)
    oversized = httpx.post(f"{server.url}/v1/tasks", headers=token, data={"spec": spec},
                           files={"upload": ("upload.tar.gz", b"\0" * (3 * MiB), "application/gzip")}, timeout=60)
    assert oversized.status_code == 413 and oversized.json()["error"]["exit_code"] == 2
    # the JSON body can't carry an upload, and a declared upload needs its archive
    missing = httpx.post(f"{server.url}/v1/tasks", headers=token,
                         json={"image": TEST_IMAGE, "command": ["true"], "upload": "/workspace"})
    assert missing.status_code == 422 and "the archive to place there is missing" in missing.text
    assert len(store.list_tasks(limit=None)) == before + 1

    # a task whose upload is fine runs with it; one cancelled while running still gives its outputs back
    fine = tmp_path / "fine"
    fine.mkdir()
    (fine / "hello.sh").write_text("mkdir /res; echo from-upload > /res/r.txt; echo started; sleep 300\n")
    slow = cli(ana, "submit", "-q", "--upload", f"{fine}:/code", "--output", "/res", TEST_IMAGE, "sh", "hello.sh")
    assert slow.returncode == 0, slow.stderr
    slow_id = slow.stdout.strip()
    wait_for(lambda: "started" in cli(ana, "logs", slow_id).stdout, 60, 0.5, "the task to start")
    assert cli(ana, "cancel", slow_id).returncode == 0
    ended = wait_ended(store, slow_id)
    assert ended.status == S.CANCELLED
    assert [a["path"] for a in json.loads(cli(ana, "artifacts", slow_id, "--json").stdout)] == ["/res/r.txt"]
    assert cli(ana, "cp", f"{slow_id}:/res/r.txt", "-").stdout == "from-upload\n"


def tar_gz(name: str, size: int) -> bytes:
    """A hand-crafted tar.gz with one file of ``size`` zero bytes (streamed in: never held whole)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.size = size
        tar.addfile(info, io.BufferedReader(_Zeros(size)))
    return out.getvalue()


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n
