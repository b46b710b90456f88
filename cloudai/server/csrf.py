"""Cross-site request forgery protection for the browser's session cookie.

A browser attaches the ``cloudai_session`` cookie to every request to this server, whichever page started it;
an ``Authorization`` header it never adds by itself. So a cookie-authenticated unsafe request (POST, PUT, PATCH,
DELETE) must also carry ``X-CSRF-Token``: a value that only pages of this origin can read. The value is an
HMAC of the session id (keyed by it), so it is bound to the session, needs nothing more on the server, and a
cookie planted by a sibling host can't forge it. Login sets it as the readable (not HttpOnly) ``cloudai_csrf``
cookie and the web pages carry it in a ``<meta>`` tag. Bearer requests need none: no browser sends them
unasked. The login form itself has no session yet: there SameSite=Strict plus an Origin/Referer check apply.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from urllib.parse import urlsplit

from fastapi import Request, Response

from cloudai.errors import Forbidden

COOKIE = "cloudai_csrf"
HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_CONTEXT = b"cloudai csrf v1"
# a path on this server: "/" then no "/" or "\\" (browsers read "//x" and "/\\x" as another host), and no
# whitespace or control characters (URL parsers drop tabs and newlines, which could make "/\t/x" into "//x")
_LOCAL_PATH = re.compile(r"/(?![/\\])[^\s\x00-\x1f\x7f\\]*")


def token_for(session: str) -> str:
    """The CSRF value of a session id (hex HMAC-SHA256 keyed by the id; reveals nothing of it)."""
    return hmac.new(session.encode(), _CONTEXT, hashlib.sha256).hexdigest()


def require(request: Request, session: str) -> None:
    """For a cookie-authenticated request: unsafe methods must carry the session's CSRF value (403 if not)."""
    if request.method.upper() in SAFE_METHODS:
        return
    sent = request.headers.get(HEADER, "")
    if not sent or not hmac.compare_digest(sent.encode(), token_for(session).encode()):
        raise Forbidden(f"missing or wrong {HEADER} header: a request signed in by the browser cookie must send "
                        f"the value of the {COOKIE} cookie in it (or use `Authorization: Bearer <token>`)")


def set_cookie(response: Response, session: str, secure: bool, max_age: int | None = None) -> None:
    """Give the browser the session's CSRF value in a cookie its pages' scripts can read (for as long as the
    session lasts; without ``max_age``, until the browser closes)."""
    response.set_cookie(COOKIE, token_for(session), httponly=False, samesite="strict", secure=secure, path="/",
                        max_age=max_age)


def forget(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/", samesite="strict")


def same_origin(request: Request) -> None:
    """For requests that have no session yet (login, logout): a browser's ``Origin`` (else ``Referer``) must be
    this server (403 if it names another). Clients that send neither (the CLI, curl) are not browsers."""
    origin = request.headers.get("origin")
    source = origin if origin is not None else request.headers.get("referer")
    if source is None:
        return
    # Host only: X-Forwarded-Host is anyone's to send (a proxy in front passes Host on, as the README's does)
    host = request.headers.get("host") or ""
    netloc = urlsplit(source).netloc if source != "null" else ""
    if not netloc or netloc.lower() != host.strip().lower():
        raise Forbidden(f"cross-site request refused: it came from {source!r}, not from this server ({host})")


def local_path(value: str | None) -> str | None:
    """``value`` if it is a path on this server (where a sign-in may send the browser next), else None."""
    return value if value and _LOCAL_PATH.fullmatch(value) else None
