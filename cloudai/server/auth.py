"""Who a request comes from: ``Authorization: Bearer <token>`` or the cookie that ``POST /login`` sets.
The user of every request is the token's; a client can't name another."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from cloudai import tokens
from cloudai.api import CloudAI
from cloudai.errors import AuthError, Forbidden
from cloudai.models import utcnow
from cloudai.server import csrf
from cloudai.tokens import Identity

COOKIE = "cloudai_token"
MAX_FORM_BYTES = 4096


def cloud(request: Request) -> CloudAI:
    """The app's :class:`CloudAI` (one per server process; connections open on first use)."""
    return request.app.state.cloud  # type: ignore[no-any-return]


def presented_token(request: Request) -> tuple[str | None, bool]:
    """The token, and whether it came from the login cookie: a Bearer header wins; any other Authorization
    header (a proxy's Basic auth, an empty one) is ignored when the cookie is there, else refused."""
    header = request.headers.get("authorization", "").strip()
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip(), False
    cookie = request.cookies.get(COOKIE) or None
    if cookie is not None:
        return cookie, True
    if header:
        raise AuthError("use the header `Authorization: Bearer <token>` (other schemes are not accepted)")
    return None, False


def identity(request: Request) -> Identity:
    """The dependency every API route takes: the caller, or 401 saying what to do (403 for a cookie-signed
    unsafe request without its CSRF value)."""
    token, from_cookie = presented_token(request)
    who = tokens.verify(cloud(request).store, token)
    if from_cookie and token:  # signed in by the cookie, which browsers send unasked
        csrf.require(request, token)
    return who


def cookie_max_age(who: Identity) -> int:
    """The login cookie lives 30 days, never longer than its token."""
    left = 30 * 86400
    if who.expires_at is not None:
        left = min(left, int((who.expires_at - utcnow()).total_seconds()))
    return max(1, left)


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
    """Sign in with a token (form field ``token``): sets an HttpOnly, SameSite=Strict cookie that the API
    accepts like a Bearer token. With a form field ``next`` (a path on this server), redirects there."""
    csrf.same_origin(request)
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise AuthError("the login form is too large; send only the field `token`")
    form = parse_qs(body.decode("utf-8", "replace"))
    token = (form.get("token") or [""])[0].strip()
    who = await run_in_threadpool(tokens.verify, cloud(request).store, token)
    target = csrf.local_path((form.get("next") or [""])[0])
    response: Response
    if target is not None:
        response = RedirectResponse(target, status_code=303)
    else:
        response = JSONResponse({"user": who.user, "admin": who.admin, "token": who.prefix})
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https",
                        path="/", max_age=cookie_max_age(who))
    csrf.set_cookie(response, token, secure=request.url.scheme == "https")
    return response


@router.post("/logout", tags=["identity"])
def logout(request: Request) -> Response:
    """Forget the login cookie."""
    csrf.same_origin(request)
    response = JSONResponse({"ok": True})
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    csrf.forget(response)
    return response
