"""The app factory: ``create_app(settings)`` builds the FastAPI app (nothing is built at import time)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloudai.api import CloudAI
from cloudai.errors import CloudAIError, ExitCode
from cloudai.models import format_bytes
from cloudai.server import artifact_routes, auth, errors, logstream, routes
from cloudai.settings import Settings
from cloudai.web import install as install_web_pages

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 1024 * 1024  # a submit request with a long script and many env values fits easily


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413, whether or not they declare a Content-Length. A
    submit with an upload (a multipart ``POST /v1/tasks``) may be ``upload_limit`` bytes more."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES, upload_limit: int = 0) -> None:
        self.app = app
        self.limit = limit
        self.upload_limit = upload_limit

    def _limit(self, scope: Scope, headers: dict[bytes, bytes]) -> tuple[int, bool]:
        upload = (scope.get("method") == "POST" and scope.get("path") == "/v1/tasks"
                  and headers.get(b"content-type", b"").startswith(b"multipart/form-data"))
        if upload:
            return self.limit + (self.upload_limit or 1 << 40), True
        return self.limit, False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        limit, upload = self._limit(scope, headers)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, upload)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(scope, receive, send, upload)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, upload: bool = False) -> None:
        if upload:
            body = errors.error_response(413, "PayloadTooLarge", "the upload is over "
                                         f"{format_bytes(self.upload_limit)} (CLOUDAI_UPLOAD_MAX_BYTES); leave out "
                                         "what the task does not need (.cloudaiignore)", ExitCode.USAGE)
        else:
            body = errors.error_response(413, "PayloadTooLarge",
                                         f"the request body is over {self.limit // 1024} KiB; send less")
        await body(scope, receive, send)


class _TooLarge(Exception):
    pass


class SecurityHeaders:
    """Every response: never cached by a shared cache or the browser (they are one user's data) unless it says
    otherwise, and never content-sniffed (a log served as text/plain stays text)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                names = {name.lower() for name, _ in headers}
                if b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                headers.append((b"x-content-type-options", b"nosniff"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def create_app(settings: Settings, cloud: CloudAI | None = None) -> FastAPI:
    """The master's app for ``settings`` (``cloud``: the operations to use, by default the cluster of
    ``settings``, placing tasks and sending them with a Celery app of its own)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.cloud.start_placer()  # placement passes run on its thread, never in a user's request
        yield
        if app.state.log_hub is not None:
            await app.state.log_hub.close()

    app = FastAPI(title="CloudAI", summary="Run containers on a pool of GPU and CPU hosts", version="1",
                  lifespan=lifespan)
    app.state.settings = settings
    if cloud is None:
        from cloudai.celery_app import dispatcher, make_app

        cloud = CloudAI(settings, dispatcher(make_app(settings)))
    app.state.cloud = cloud
    app.state.log_hub = None  # made on the first log request, in the server's event loop
    app.state.limits = auth.Limits(settings)
    errors.install(app)
    app.add_middleware(BodyLimit, upload_limit=settings.upload_max_bytes)
    app.add_middleware(SecurityHeaders)
    app.include_router(auth.router)
    app.include_router(routes.router)
    app.include_router(artifact_routes.router)
    app.include_router(logstream.router)
    install_web_pages(app)

    @app.get("/healthz", tags=["health"])
    def healthz(request: Request) -> Any:
        """200 when the store and Redis answer, else 503 saying which does not (no token needed)."""
        api: CloudAI = request.app.state.cloud
        try:
            api.store.ping()
            api.ping_redis()
        except CloudAIError as exc:  # no addresses to callers without a token: the server's log has them
            which = "redis" if "Redis" in type(exc).__name__ else "store"
            log.warning("health check failed: %s", exc)
            return JSONResponse({"status": "unavailable", "reason": f"the {which} can't be reached"},
                                status_code=503)
        return {"status": "ok"}

    return app
