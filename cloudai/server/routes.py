"""The task and worker endpoints. Each calls the same :class:`cloudai.api.CloudAI` operation the CLI calls in
direct mode; what this module adds is who may do it. Sync handlers: FastAPI runs them in its thread pool."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import pydantic
from fastapi import APIRouter, Depends, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from cloudai.api import CloudAI
from cloudai.errors import TaskNotFound, ValidationError
from cloudai.models import LIVE, Task, TaskStatus, WorkerState, quota_doc
from cloudai.server.auth import Admin, Caller, cloud
from cloudai.server.schemas import SubmitBody
from cloudai.tokens import Identity

router = APIRouter(prefix="/v1")
MAX_SPEC_BYTES = 1024 * 1024  # the JSON of a task, as for a body without an upload
Cloud = Annotated[CloudAI, Depends(cloud)]


def owned_task(api: CloudAI, who: Identity, task_id: str) -> Task:
    """The task if the caller may see it; another user's task is "not found", exactly like an unknown one."""
    task = api.get(task_id)
    if not who.admin and task.user_id != who.user:
        raise TaskNotFound(task_id)
    return task


def task_doc(task: Task) -> dict[str, Any]:
    return jsonable_encoder(task.to_doc())  # type: ignore[no-any-return]


def parse_body(raw: bytes | str) -> SubmitBody:
    """A submit body from its JSON text; pydantic's errors become the API's 422 (as for any other body)."""
    try:
        return SubmitBody.model_validate_json(raw)
    except pydantic.ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


_SUBMIT_SCHEMA = SubmitBody.model_json_schema()
_SUBMIT_OPENAPI: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _SUBMIT_SCHEMA},
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["spec", "upload"],
        "properties": {"spec": {"type": "string", "description": "the JSON body above, as text"},
                       "upload": {"type": "string", "format": "binary",
                                  "description": "a directory as a tar.gz, placed at `upload` in the container "
                                                 "(`cloudai submit --upload DIR` packs it)"}}}}}}}


@router.post("/tasks", status_code=201, tags=["tasks"], response_model=None, openapi_extra=_SUBMIT_OPENAPI)
async def submit(request: Request, api: Cloud, who: Caller,
                 dry_run: Annotated[bool, Query(description="validate and say where it would go")] = False
                 ) -> dict[str, Any] | JSONResponse:
    """Record and place a task owned by the caller (201 + the task); with ``dry_run``, only where it would go.
    The body is the task as JSON; a task with an upload sends a multipart form instead: the JSON as the field
    ``spec`` and the tar.gz as the file ``upload`` (never inside the JSON)."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async with request.form(max_files=1, max_fields=1, max_part_size=MAX_SPEC_BYTES) as form:
            spec, upload = form.get("spec"), form.get("upload")
            if not isinstance(spec, str) or not isinstance(upload, UploadFile):
                raise ValidationError("upload", "the form", "send the task as the field 'spec' (JSON text) and the "
                                      "archive as the file 'upload'")
            task_request = parse_body(spec).to_request(who.user)
            if dry_run:
                return JSONResponse({"valid": True, "placement": await run_in_threadpool(api.dry_run, task_request)})
            return task_doc(await run_in_threadpool(api.submit, task_request, upload.file))
    task_request = parse_body(await request.body()).to_request(who.user)
    if dry_run:
        return JSONResponse({"valid": True, "placement": await run_in_threadpool(api.dry_run, task_request)})
    return task_doc(await run_in_threadpool(api.submit, task_request))


@router.get("/tasks", tags=["tasks"])
def list_tasks(api: Cloud, who: Caller, status: Annotated[list[str] | None, Query()] = None,
               worker: str | None = None, user: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10000)] = 50,
               before: Annotated[str | None, Query(description="a task id: only tasks created before it")] = None,
               ) -> list[dict[str, Any]]:
    """Tasks, newest first: the caller's own; an admin's ``user`` may name anyone or ``all``."""
    if who.admin:
        owner = None if user == "all" else (user or who.user)
    elif user not in (None, "all", who.user):
        return []  # another user's tasks are not there for this caller
    else:
        owner = who.user
    statuses = []
    for value in status or []:
        try:
            statuses.append(TaskStatus(value))
        except ValueError:
            raise ValidationError("status", value, f"use one of {', '.join(s.value for s in TaskStatus)}") from None
    if before is None:
        return [task_doc(t) for t in api.list_tasks(user=owner, status=statuses, worker=worker, limit=limit)]
    cutoff = owned_task(api, who, before).created_at
    tasks = api.list_tasks(user=owner, status=statuses, worker=worker, limit=None)
    return [task_doc(t) for t in tasks if t.created_at < cutoff][:limit]


@router.get("/tasks/{task_id}", tags=["tasks"])
def get_task(task_id: str, api: Cloud, who: Caller) -> dict[str, Any]:
    """One task's record."""
    return task_doc(owned_task(api, who, task_id))


@router.post("/tasks/{task_id}/cancel", tags=["tasks"])
async def cancel(task_id: str, api: Cloud, who: Caller, wait: bool = True) -> dict[str, Any]:
    """Cancel a task (a running one has its container stopped); with ``wait``, until the worker did. The wait
    holds no server thread (many waiting cancels must not starve other users' requests)."""
    await run_in_threadpool(owned_task, api, who, task_id)
    task = await run_in_threadpool(api.cancel, task_id, who.user, 0)
    if wait and not task.status.terminal:
        deadline = time.monotonic() + api.settings.stop_grace_s + 15
        while time.monotonic() < deadline and not task.status.terminal:
            await asyncio.sleep(0.2)
            task = await run_in_threadpool(api.get, task_id)
    return task_doc(task)


@router.get("/quota", tags=["quotas"])
def quota(api: Cloud, who: Caller, user: str | None = None) -> dict[str, Any]:
    """The caller's quota and what their queued and running tasks hold (admins: any ``user``'s)."""
    whose = user if who.admin and user else who.user
    limits, used = api.quota_usage(whose)
    return jsonable_encoder(quota_doc(whose, limits, used))  # type: ignore[no-any-return]


@router.get("/workers", tags=["workers"])
def workers(api: Cloud, who: Caller) -> list[dict[str, Any]]:
    """Workers with capacity, GPUs, state, heartbeat age and whether each has room. Admins see every user's use
    of each and the task it is kept for; a user sees only their own tasks' use (``usage_of``: their name):
    other users' load is not theirs to see."""
    views = api.workers()
    if not who.admin:
        mine = api.list_tasks(user=who.user, status=list(LIVE), limit=None)
        views = [v.only(who.user, mine) for v in views]
    return [jsonable_encoder(v.to_doc()) for v in views]


@router.post("/workers/{worker_id}/drain", tags=["workers"])
def drain(worker_id: str, api: Cloud, who: Admin) -> dict[str, Any]:
    """Stop placing tasks on a worker (admins only)."""
    return jsonable_encoder(api.set_worker_state(worker_id, WorkerState.DRAINING).to_doc())  # type: ignore[no-any-return]


@router.post("/workers/{worker_id}/undrain", tags=["workers"])
def undrain(worker_id: str, api: Cloud, who: Admin) -> dict[str, Any]:
    """Place tasks on a worker again (admins only)."""
    return jsonable_encoder(api.set_worker_state(worker_id, WorkerState.ACTIVE).to_doc())  # type: ignore[no-any-return]


@router.delete("/workers/{worker_id}", tags=["workers"])
def remove_worker(worker_id: str, api: Cloud, who: Admin, force: bool = False) -> dict[str, Any]:
    """Forget a worker (admins only); one with live tasks needs ``force``."""
    api.remove_worker(worker_id, force)
    return {"removed": worker_id}


