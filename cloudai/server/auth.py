"""Who a request comes from: ``Authorization: Bearer <token>``, or the browser session that ``POST /login``
starts (:mod:`cloudai.sessions`; the cookie holds a session id, never the token). The user of every request is
the token's; a client can't name another. Here too the per-client limits (:mod:`cloudai.server.throttle`):
failed sign-ins per address, and a request rate per token."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from cloudai import sessions, tokens
from cloudai.api import CloudAI
from cloudai.errors import AuthError, Forbidden
from cloudai.server import csrf
from cloudai.server.throttle import RateLimit, SignInGuard
from cloudai.settings import Settings
from cloudai.tokens import Identity

COOKIE = "cloudai_session"
LEGACY_COOKIE = "cloudai_token"  # earlier releases kept the token itself in the cookie: cleared when seen
MAX_FORM_BYTES = 4096


def cloud(request: Request) -> CloudAI:
    """The app's :class:`CloudAI` (one per server process; connections open on first use)."""
    return request.app.state.cloud  # type: ignore[no-any-return]


class Limits:
    """The master's per-client limits, made from its settings (``app.state.limits``)."""

    def __init__(self, settings: Settings) -> None:
        self.reads = RateLimit(settings.api_read_rate, settings.api_read_burst, "reads (GET requests)")
        self.writes = RateLimit(settings.api_write_rate, settings.api_write_burst,
                                "changes (POST, PUT, PATCH, DELETE requests)")
        self.sign_ins = SignInGuard(settings.signin_failures, settings.signin_window_s)


def limits(request: Request) -> Limits:
    return request.app.state.limits  # type: ignore[no-any-return]


def client_address(request: Request) -> str:
    """The client's address (a trusted proxy's X-Forwarded-For applied by the server: --forwarded-allow-ips)."""
    return request.client.host if request.client else "unknown"


def presented(request: Request) -> tuple[str | None, str | None]:
    """``(token, session id)``, at most one of them: a Bearer header wins; any other Authorization header (a
    proxy's Basic auth, an empty one) is ignored when the session cookie is there, else refused."""
    header = request.headers.get("authorization", "").strip()
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip(), None
    cookie = request.cookies.get(COOKIE) or None
    if cookie is not None:
        return None, cookie
    if header:
        raise AuthError("use the header `Authorization: Bearer <token>` (other schemes are not accepted)")
    return None, None


def sign_in(request: Request, token: str | None, how: str) -> Identity:
    """Verify a token a client presented (``how``: ``bearer`` or ``login``). A wrong one counts against the
    client's address (logged); an address past its limit gets 429 whatever token it presents."""
    if not token:
        return tokens.verify(cloud(request).store, token)  # says how to get one; not a guess, not counted
    guard = limits(request).sign_ins
    address = client_address(request)
    guard.check(address)
    try:
        return tokens.verify(cloud(request).store, token)
    except AuthError as exc:
        guard.failed(address, how, str(exc))
        raise


def identity(request: Request) -> Identity:
    """The dependency every API route takes: the caller, or 401 saying what to do (403 for a cookie-signed
    unsafe request without its CSRF value; 429 past the token's request rate or the address's failed
    sign-ins)."""
    token, session = presented(request)
    if session is not None:  # signed in by the cookie, which browsers send unasked
        who = sessions.resume(cloud(request).store, session)
        csrf.require(request, session)
    else:
        who = sign_in(request, token, "bearer")
    rate = limits(request).reads if request.method.upper() in csrf.SAFE_METHODS else limits(request).writes
    rate.take(who.token_hash or who.user)
    return who


def admin(who: Annotated[Identity, Depends(identity)]) -> Identity:
    """Only admins (403 for users)."""
    if not who.admin:
        raise Forbidden(f"user {who.user!r} may not administer workers; an admin token is needed")
    return who


Caller = Annotated[Identity, Depends(identity)]
Admin = Annotated[Identity, Depends(admin)]

router = APIRouter()


@router.get("/v1/whoami", tags=["identity"])
def whoami(who: Caller) -> dict[str, object]:
    """The token's user and role."""
    return {"user": who.user, "admin": who.admin, "token": who.prefix}


@router.post("/login", tags=["identity"], response_model=None)
async def login(request: Request) -> Response:
    """Sign in with a token (form field ``token``): starts a browser session (an HttpOnly, SameSite=Strict cookie
    holding its id, which the API accepts; ``CLOUDAI_SESSION_TTL``, never past the token's expiry). With a form
    field ``next`` (a path on this server), redirects there."""
    csrf.same_origin(request)
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise AuthError("the login form is too large; send only the field `token`")
    form = parse_qs(body.decode("utf-8", "replace"))
    token = (form.get("token") or [""])[0].strip()
    who = await run_in_threadpool(sign_in, request, token, "login")
    limits(request).writes.take(who.token_hash)  # each sign-in stores a session
    settings: Settings = request.app.state.settings
    session, record = await run_in_threadpool(sessions.start, cloud(request).store, who, settings.session_ttl_s)
    target = csrf.local_path((form.get("next") or [""])[0])
    response: Response
    if target is not None:
        response = RedirectResponse(target, status_code=303)
    else:
        response = JSONResponse({"user": who.user, "admin": who.admin, "token": who.prefix})
    secure = request.url.scheme == "https"
    max_age = sessions.seconds_left(record)
    response.set_cookie(COOKIE, session, httponly=True, samesite="strict", secure=secure, path="/", max_age=max_age)
    csrf.set_cookie(response, session, secure=secure, max_age=max_age)
    forget_legacy(request, response)
    return response


@router.post("/logout", tags=["identity"])
def logout(request: Request) -> Response:
    """End the browser session: deleted on the server (its cookie is refused from now on) and in the browser."""
    csrf.same_origin(request)
    session = request.cookies.get(COOKIE)
    if session:
        sessions.end(cloud(request).store, session)
    response = JSONResponse({"ok": True})
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    csrf.forget(response)
    forget_legacy(request, response)
    return response


def forget_legacy(request: Request, response: Response) -> None:
    """An earlier release's cookie held the API token itself: the browser drops it."""
    if request.cookies.get(LEGACY_COOKIE):
        response.delete_cookie(LEGACY_COOKIE, path="/", httponly=True, samesite="strict")


@router.get("/v1/admin/sign-in-failures", tags=["identity"])
def sign_in_failures(request: Request, who: Admin) -> dict[str, object]:
    """Failed sign-ins since the server started, and the addresses with recent ones (admins only)."""
    return limits(request).sign_ins.report()
