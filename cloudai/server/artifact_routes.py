"""The artifact endpoints: a task's stored outputs, listed and downloaded (streamed, resumable with ``Range``),
with the ownership rule of every task endpoint: another user's task is "not found", exactly like an unknown
one. Sync handlers: FastAPI runs them, and the download's reads, in its thread pool."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from cloudai.artifacts import Artifact
from cloudai.errors import ArtifactNotFound
from cloudai.server.auth import Caller
from cloudai.server.errors import error_response
from cloudai.server.routes import Cloud, owned_task

router = APIRouter(prefix="/v1")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
PIECE = 256 * 1024  # bytes read from the store at a time


@router.get("/tasks/{task_id}/artifacts", tags=["artifacts"])
def list_artifacts(task_id: str, api: Cloud, who: Caller) -> dict[str, Any]:
    """The files the task's current attempt stored from its ``outputs`` (path, size, SHA-256), by path; empty
    until its container has ended."""
    task = owned_task(api, who, task_id)
    found = api.artifacts(task_id)
    return {"task_id": task.task_id, "attempt": task.attempt, "status": task.status.value,
            "outputs": task.outputs, "artifacts": [a.to_doc() for a in found],
            "total_bytes": sum(a.size for a in found)}


@router.delete("/tasks/{task_id}/artifacts", tags=["artifacts"])
def delete_artifacts(task_id: str, api: Cloud, who: Caller) -> dict[str, Any]:
    """Remove a finished task's stored files (its outputs and its upload): they no longer count in its user's
    artifact quota."""
    owned_task(api, who, task_id)
    return {"task_id": task_id, "freed_bytes": api.delete_artifacts(task_id)}


def _range(request: Request, artifact: Artifact) -> tuple[int, int] | None:
    """The one byte range asked for, as ``(first, last)``; None for the whole file (no ``Range``, several ranges,
    or an ``If-Range`` for another version)."""
    header = request.headers.get("range")
    if not header:
        return None
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range.strip() != _etag(artifact):
        return None
    match = _RANGE.fullmatch(header.strip())
    if not match or not (match.group(1) or match.group(2)):
        return None
    size = artifact.size
    if not match.group(1):  # the last N bytes
        first, last = max(0, size - int(match.group(2))), size - 1
    else:
        first = int(match.group(1))
        last = min(size - 1, int(match.group(2))) if match.group(2) else size - 1
    return first, last


def _etag(artifact: Artifact) -> str:
    return f'"{artifact.sha256}"'


@router.get("/tasks/{task_id}/artifacts/{path:path}", tags=["artifacts"], response_model=None)
def download(task_id: str, path: str, request: Request, api: Cloud, who: Caller) -> Response:
    """One stored file's bytes, streamed (``application/octet-stream``), with ``Content-Length``, its SHA-256 in
    ``X-Checksum-Sha256`` and as the ``ETag``; ``Range: bytes=N-`` resumes a download (206), checked with
    ``If-Range``. PATH is the file's path in the container (``/out/model.pt`` as ``out/model.pt``)."""
    owned_task(api, who, task_id)
    artifact = api.artifact(task_id, path)
    wanted = _range(request, artifact)
    headers = {"Accept-Ranges": "bytes", "ETag": _etag(artifact), "X-Checksum-Sha256": artifact.sha256,
               "Content-Disposition": f"attachment; filename*=UTF-8''{quote(posixpath.basename(artifact.path))}"}
    if wanted is not None and (wanted[0] >= artifact.size or wanted[0] > wanted[1]):
        return error_response(416, "RangeNotSatisfiable", f"the file has {artifact.size} bytes",
                              headers={"Content-Range": f"bytes */{artifact.size}"})
    first, last = wanted if wanted is not None else (0, artifact.size - 1)
    try:
        stream = api.artifact_store.open(artifact)
    except FileNotFoundError:
        raise ArtifactNotFound(task_id, artifact.path) from None
    if first:
        stream.seek(first)

    def pieces() -> Iterator[bytes]:
        left = last - first + 1
        try:
            while left > 0:
                chunk = stream.read(min(PIECE, left))
                if not chunk:
                    return  # removed meanwhile: the client's size check catches the short file
                left -= len(chunk)
                yield chunk
        finally:
            stream.close()

    headers["Content-Length"] = str(max(0, last - first + 1))
    if wanted is not None:
        headers["Content-Range"] = f"bytes {first}-{last}/{artifact.size}"
    return StreamingResponse(pieces(), status_code=206 if wanted is not None else 200, headers=headers,
                             media_type="application/octet-stream")
