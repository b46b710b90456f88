"""CloudAI errors as HTTP answers: ``{"error": {"type", "message", "exit_code"}}`` with the matching status.
``exit_code`` is what the CLI exits with for it, so the CLI through the API exits as it does in direct mode.
Nothing else leaks: no stack trace, no URL password (the error classes redact them), no other user's data."""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from cloudai.errors import AuthError, CloudAIError, ExitCode, Forbidden, RedisUnavailable, TaskExists

log = logging.getLogger("cloudai.server")

_STATUS_BY_EXIT = {
    ExitCode.USAGE: 422,
    ExitCode.NOT_FOUND: 404,
    ExitCode.UNAVAILABLE: 503,
}


def http_status(exc: CloudAIError) -> int:
    """The HTTP status of a CloudAI error."""
    if isinstance(exc, AuthError):
        return 401
    if isinstance(exc, Forbidden):
        return 403
    if isinstance(exc, TaskExists):
        return 409
    return _STATUS_BY_EXIT.get(exc.exit_code, 409)  # anything else: the request conflicts with the state


def error_body(kind: str, message: str, exit_code: int = ExitCode.ERROR) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message, "exit_code": int(exit_code)}}


def error_response(status: int, kind: str, message: str, exit_code: int = ExitCode.ERROR) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="cloudai"'} if status == 401 else None
    return JSONResponse(error_body(kind, message, exit_code), status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> str:
    """Pydantic's errors as one readable line per field, such as ``body.cpus: ...``."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "extra_forbidden":
            msg = "unknown field; see /docs for the fields this endpoint takes"
        elif err.get("type") == "missing":
            msg = "required"
        parts.append(f"{where}: {msg}")
    return "invalid request: " + "; ".join(parts)


def forget_session(request: Request, response: Response) -> None:
    """A login cookie whose token no longer works (expired, revoked) is cleared, not sent again and again."""
    from cloudai.server import auth, csrf

    if request.cookies.get(auth.COOKIE):
        response.delete_cookie(auth.COOKIE, path="/", httponly=True, samesite="strict")
        csrf.forget(response)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every failure into the error JSON."""

    @app.exception_handler(CloudAIError)
    async def cloudai_error(request: Request, exc: CloudAIError) -> JSONResponse:
        response = error_response(http_status(exc), type(exc).__name__, str(exc), exc.exit_code)
        if isinstance(exc, AuthError):
            forget_session(request, response)
        return response

    @app.exception_handler(redis.RedisError)
    async def redis_error(request: Request, exc: redis.RedisError) -> JSONResponse:
        err = RedisUnavailable(request.app.state.settings.redis_url, exc)
        return error_response(503, type(err).__name__, str(err), err.exit_code)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "ValidationError", validation_message(exc), ExitCode.USAGE)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "NotFound", 405: "MethodNotAllowed", 413: "PayloadTooLarge"}.get(exc.status_code, "HTTPError")
        code = ExitCode.NOT_FOUND if exc.status_code == 404 else ExitCode.ERROR
        return error_response(exc.status_code, kind, str(exc.detail), code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return error_response(500, "InternalError", "internal error in the CloudAI server; its log has the details")
