"""``cloudai artifacts TASK`` (what a task's outputs stored: path, size, SHA-256) and ``cloudai cp TASK:PATH DEST``
(a download through the master, streamed to a ``.part`` file, checked against the stored size and SHA-256
before it takes DEST's name, and resumed from where it stopped when run again)."""

from __future__ import annotations

import hashlib
import os
import sys
from typing import TYPE_CHECKING, Any, BinaryIO

import click

if TYPE_CHECKING:
    from cloudai.artifacts.base import Artifact
    from cloudai.cli.client import Client

PART = ".cloudai-part"  # suffix of a download in progress (what `cp` resumes)


def register(cli: click.Group, pass_ctx: Any) -> None:
    """Add ``artifacts`` and ``cp`` to the CLI."""

    @cli.command("artifacts")
    @click.argument("task_id")
    @click.option("--json", "as_json", is_flag=True, help="As JSON: path, size, sha256, stored_at of each.")
    @click.option("--delete", is_flag=True, help="Remove the finished task's stored files (frees your quota).")
    @pass_ctx
    def artifacts(ctx: Any, task_id: str, as_json: bool, delete: bool) -> None:
        """List the files TASK's --output paths stored (path, size, SHA-256); `cloudai cp` downloads them."""
        from cloudai.cli import render
        from cloudai.models import format_bytes

        if delete:
            freed = ctx.master("artifacts --delete").delete_artifacts(task_id)
            click.echo(f"{task_id}: stored files removed ({format_bytes(freed)} freed)")
            return
        api = ctx.api
        found = api.artifacts(task_id)
        if as_json:
            click.echo(render.to_json([a.to_doc() for a in found]))
            return
        if not found:
            task = api.get(task_id)
            why = ("it names no --output" if not task.outputs else
                   "its container has not ended yet" if not task.status.terminal else
                   "see `cloudai status " + task_id + "` for why")
            click.echo(render.visible(f"no files stored for task {task_id}: {why}"), err=True)
            return
        from rich.table import Table

        table = Table(box=None, header_style="bold")
        for col in ("PATH", "SIZE", "SHA256"):
            table.add_column(col, no_wrap=True)
        for a in found:
            table.add_row(render.cell(a.path), render.cell(format_bytes(a.size)), render.cell(a.sha256))
        render.console().print(table)

    @cli.command("cp")
    @click.argument("source", metavar="TASK:PATH")
    @click.argument("dest")
    @pass_ctx
    def cp(ctx: Any, source: str, dest: str) -> None:
        """Download what TASK stored at PATH (a file, or a directory's files) to DEST, checked by size and SHA-256.

        \b
        A file goes to DEST (into it when DEST is a directory; `-` writes it to standard output); a directory's
        files go below DEST, made if needed. An interrupted download resumes when run again.
        """
        from cloudai.artifacts.base import output_path
        from cloudai.errors import ArtifactNotFound

        task_id, sep, path = source.partition(":")
        if not sep or not task_id or not path:
            raise click.UsageError("name what to copy as TASK:PATH, such as 3f2a9c0d1e2b:/out/model.pt")
        api: Client = ctx.api
        wanted = output_path(path)
        listing = api.artifacts(task_id)
        exact = [a for a in listing if a.path == wanted]
        if exact:
            target = dest
            if dest != "-" and os.path.isdir(dest):
                target = os.path.join(dest, os.path.basename(wanted))
            _download(api, task_id, exact[0], target)
            return
        prefix = wanted.rstrip("/") + "/"
        below = [a for a in listing if a.path.startswith(prefix)]
        if not below:
            raise ArtifactNotFound(task_id, wanted)
        if dest == "-" or (os.path.exists(dest) and not os.path.isdir(dest)):
            raise click.UsageError(f"{wanted} is a directory of {len(below)} files: give a directory as DEST")
        for artifact in below:
            parts = artifact.path[len(prefix):].split("/")
            if any(p in ("", ".", "..") for p in parts):  # never written outside DEST, whatever the server said
                raise click.ClickException(f"refusing to write {artifact.path!r} outside {dest}")
            target = os.path.join(dest, *parts)
            try:
                os.makedirs(os.path.dirname(target), exist_ok=True)
            except OSError as exc:
                raise click.ClickException(f"can't make {os.path.dirname(target)}: {exc.strerror}") from None
            _download(api, task_id, artifact, target)


def _download(api: Client, task_id: str, artifact: Artifact, target: str) -> None:
    """:func:`_fetch`, with a local file that can't be written as a clear error (exit 1)."""
    try:
        _fetch(api, task_id, artifact, target)
    except OSError as exc:
        raise click.ClickException(f"can't write {exc.filename or target}: {exc.strerror or exc}") from None


def _fetch(api: Client, task_id: str, artifact: Artifact, target: str) -> None:
    """One file to ``target`` (``-``: standard output), through ``target.cloudai-part``, resumed from a part an
    earlier run left; checked by size and SHA-256 before it is renamed (a mismatch removes the part)."""
    from cloudai.models import format_bytes

    digest = hashlib.sha256()
    if target == "-":
        out = sys.stdout.buffer
        with api.open_artifact(task_id, artifact.path) as (_, _, chunks):
            size = _copy(chunks, out, digest)
        out.flush()
        _check(artifact, size, digest.hexdigest(), None)
        return
    part = target + PART
    offset = os.path.getsize(part) if os.path.isfile(part) else 0
    if offset > artifact.size:
        offset = 0
    if offset:
        with open(part, "rb") as have:
            for chunk in iter(lambda: have.read(1 << 20), b""):
                digest.update(chunk)
    with api.open_artifact(task_id, artifact.path, offset, artifact.sha256) as (_, start, chunks):
        if start != offset:  # the stored file changed since the part was written: start again
            digest = hashlib.sha256()
        with open(part, "r+b" if start else "wb") as out:
            out.seek(start)
            out.truncate()
            size = start + _copy(chunks, out, digest)
    _check(artifact, size, digest.hexdigest(), part)
    os.replace(part, target)
    click.echo(f"{artifact.path} -> {target} ({format_bytes(artifact.size)}, sha256 {artifact.sha256[:16]}..."
               f"{', resumed at ' + format_bytes(start) if start else ''})", err=True)


def _copy(chunks: Any, out: BinaryIO, digest: Any) -> int:
    written = 0
    for chunk in chunks:
        out.write(chunk)
        digest.update(chunk)
        written += len(chunk)
    return written


def _check(artifact: Artifact, size: int, sha256: str, part: str | None) -> None:
    from cloudai.errors import CloudAIError

    if size == artifact.size and sha256 == artifact.sha256:
        return
    if part is not None:
        os.remove(part)
    raise CloudAIError(f"{artifact.path}: the download does not match what was stored ({size} of {artifact.size} "
                       f"bytes, sha256 {sha256[:16]}... instead of {artifact.sha256[:16]}...); run `cloudai cp` again")
