"""CloudAI errors as HTTP answers: ``{"error": {"type", "message", "exit_code"}}`` with the matching status.
``exit_code`` is what the CLI exits with for it, so the CLI through the API exits as it does in direct mode.
Nothing else leaks: no stack trace, no service address (an unreachable Redis or store is named by its kind
only, and any ``redis://``, ``mongodb://``... text is cut from a message; the server's log keeps the whole
message for the operator), no other user's data."""

from __future__ import annotations

import logging
import re
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from cloudai.errors import (
    AuthError,
    CloudAIError,
    DockerUnavailable,
    ExitCode,
    Forbidden,
    RedisUnavailable,
    ServiceUnavailable,
    StoreUnavailable,
    TaskExists,
    TooManyRequests,
)

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
    if isinstance(exc, TooManyRequests):
        return 429
    return _STATUS_BY_EXIT.get(exc.exit_code, 409)  # anything else: the request conflicts with the state


def error_body(kind: str, message: str, exit_code: int = ExitCode.ERROR) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message, "exit_code": int(exit_code)}}


def error_response(status: int, kind: str, message: str, exit_code: int = ExitCode.ERROR,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="cloudai"'
    return JSONResponse(error_body(kind, message, exit_code), status_code=status, headers=headers or None)


# addresses of the services behind the master (a user has no business with them, and a host name or port helps
# an attacker): cut from any message a user gets
_SERVICE_URL = re.compile(r"\b(?:rediss?|redis\+sentinel|mongodb(?:\+srv)?|sqlite|amqps?|unix|tcp)://[^\s'\",;)]*",
                          re.IGNORECASE)
_UNAVAILABLE = {
    RedisUnavailable: "the CloudAI master can't reach its Redis right now",
    StoreUnavailable: "the CloudAI master can't reach its task store right now",
    DockerUnavailable: "the Docker engine can't be reached right now",
}


def public_message(exc: CloudAIError) -> str:
    """The message a user gets for ``exc``: a service that does not answer by its kind alone (the operator's log
    has the address and the cause), and no service URL in any other message."""
    if isinstance(exc, ServiceUnavailable):
        what = next((text for kind, text in _UNAVAILABLE.items() if isinstance(exc, kind)),
                    "a service the CloudAI master needs can't be reached right now")
        return f"{what}; try again in a minute (an operator finds the cause in the server's log)"
    return _SERVICE_URL.sub("<address hidden>", str(exc))


def public_error(exc: CloudAIError) -> dict[str, Any]:
    """The error body of ``exc`` as a user gets it (see :func:`public_message`); a service outage is logged."""
    if isinstance(exc, ServiceUnavailable):
        log.warning("%s", exc)
    return error_body(type(exc).__name__, public_message(exc), exc.exit_code)


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
        headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, TooManyRequests) else None
        response = JSONResponse(public_error(exc), status_code=http_status(exc), headers=headers)
        if isinstance(exc, AuthError):
            response.headers["WWW-Authenticate"] = 'Bearer realm="cloudai"'
            forget_session(request, response)
        return response

    @app.exception_handler(redis.RedisError)
    async def redis_error(request: Request, exc: redis.RedisError) -> JSONResponse:
        err = RedisUnavailable(request.app.state.settings.redis_url, exc)
        return JSONResponse(public_error(err), status_code=503)

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
