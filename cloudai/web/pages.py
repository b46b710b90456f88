"""The page routes. Each page is a shell rendered with the caller's identity; its script fills and refreshes
it from the JSON API. The task page also renders the task's header, found with the API's own ownership rule
(:func:`cloudai.server.routes.owned_task`): another user's task is "not found" here too."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from cloudai.errors import AuthError, CloudAIError
from cloudai.models import TaskStatus, format_bytes
from cloudai.server import auth, csrf
from cloudai.server.errors import forget_session, http_status
from cloudai.server.routes import owned_task
from cloudai.tokens import Identity

HERE = Path(__file__).resolve().parent
router = APIRouter(include_in_schema=False)


def install(app: FastAPI) -> None:
    """Serve the pages at ``/`` and their script and stylesheet at ``/static``."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["when"] = when
    env.filters["size"] = format_bytes
    app.state.web_templates = env
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")


def when(value: datetime | None) -> str:
    """A timestamp as the pages show it (UTC, to the second)."""
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _render(request: Request, template: str, who: Identity | None, status_code: int = 200,
            **context: Any) -> Response:
    env: jinja2.Environment = request.app.state.web_templates
    session = request.cookies.get(auth.COOKIE) if who is not None else None
    token = csrf.token_for(session) if session else ""
    html = env.get_template(template).render(who=who, csrf_token=token, statuses=[s.value for s in TaskStatus],
                                             **context)
    response = HTMLResponse(html, status_code=status_code, headers={"Cache-Control": "no-store"})
    if session and request.cookies.get(csrf.COOKIE) != token:  # signed in before the cookie existed
        csrf.set_cookie(response, session, secure=request.url.scheme == "https")
    auth.forget_legacy(request, response)
    return response


async def _signed_in(request: Request) -> Identity | None:
    """The caller by the session cookie (pages never take a Bearer header), or None."""
    if not request.cookies.get(auth.COOKIE):
        return None
    try:
        return await run_in_threadpool(auth.identity, request)
    except AuthError:
        return None


def _to_login(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    response = RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
    forget_session(request, response)  # a cookie that did not sign in (expired, revoked token) goes
    return response


def _next(value: str | None) -> str:
    """Only a path on this server (never ``//host``): the login page can't be used to send people elsewhere."""
    return csrf.local_path(value) or "/"


@router.get("/login")
async def login_page(request: Request, next: str | None = None) -> Response:
    who = await _signed_in(request)
    return _render(request, "login.html", who, next=_next(next), page="login")


@router.get("/")
async def tasks_page(request: Request, status: str = "", user: str = "") -> Response:
    who = await _signed_in(request)
    if who is None:
        return _to_login(request)
    return _render(request, "tasks.html", who, page="tasks", status=status, user=user)


@router.get("/tasks/{task_id}")
async def task_page(request: Request, task_id: str) -> Response:
    who = await _signed_in(request)
    if who is None:
        return _to_login(request)
    try:
        task = await run_in_threadpool(owned_task, auth.cloud(request), who, task_id)
    except CloudAIError as exc:
        return _render(request, "error.html", who, status_code=http_status(exc), page="error", code=http_status(exc),
                       message=str(exc))
    artifacts: list[dict[str, Any]] = []
    if task.outputs and task.status.terminal:
        try:
            found = await run_in_threadpool(auth.cloud(request).artifacts, task_id)
        except CloudAIError:  # the artifact store away: the page still shows the task (its script retries)
            found = []
        artifacts = [{**a.to_doc(), "href": artifact_href(task_id, a.path)} for a in found]
    return _render(request, "task.html", who, page="task", task=task, artifacts=artifacts)


def artifact_href(task_id: str, path: str) -> str:
    """The download URL of a task's stored file (each path segment quoted)."""
    segments = "/".join(quote(p, safe="") for p in path.strip("/").split("/"))
    return f"/v1/tasks/{quote(task_id, safe='')}/artifacts/{segments}"


@router.get("/workers")
async def workers_page(request: Request) -> Response:
    who = await _signed_in(request)
    if who is None:
        return _to_login(request)
    return _render(request, "workers.html", who, page="workers")


@router.get("/submit")
async def submit_page(request: Request) -> Response:
    who = await _signed_in(request)
    if who is None:
        return _to_login(request)
    return _render(request, "submit.html", who, page="submit")
