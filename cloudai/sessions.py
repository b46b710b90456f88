"""Browser sessions: what the web page's cookie holds instead of the API token.

``POST /login`` checks a token and starts a session: a random id (``cas_`` + 256 bits) that the browser keeps in
an HttpOnly cookie. The store keeps only the id's SHA-256, the token it is bound to (by the token's hash), the
user and the expiry: ``CLOUDAI_SESSION_TTL`` (12 hours) after sign-in, never past the token's own expiry, and
not sliding (a browser signs in again after it, however busy it was). Each use checks the bound token again,
so a revoked or expired token ends its sessions at once; ``POST /logout`` deletes the session, so the old
cookie is refused afterwards even if a copy of it survives. A stolen cookie is worth hours, not the token's
30 days, and never reveals the token.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from cloudai import tokens
from cloudai.errors import AuthError
from cloudai.models import as_utc, utcnow
from cloudai.tokens import Identity

if TYPE_CHECKING:
    from cloudai.store.base import TaskStore

SESSION_PREFIX = "cas_"
_ENDED = "your sign-in has ended (signed out, expired, or its token was revoked); sign in again"


@dataclass
class BrowserSession:
    """A stored session (never its id, only the id's SHA-256)."""

    session_hash: str
    token_hash: str
    user_id: str
    created_at: datetime
    expires_at: datetime

    def to_doc(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> BrowserSession:
        names = cls.__dataclass_fields__
        data = {k: v for k, v in doc.items() if k in names}
        for key in ("created_at", "expires_at"):
            data[key] = as_utc(data[key])
        return cls(**data)


def start(store: TaskStore, who: Identity, ttl_s: float, now: datetime | None = None) -> tuple[str, BrowserSession]:
    """A new session for the signed-in ``who`` (whose ``token_hash`` it is bound to): ``(id, record)``; the id is
    for the cookie and is never stored."""
    import secrets

    now = now or utcnow()
    expires = now + timedelta(seconds=ttl_s)
    if who.expires_at is not None:
        expires = min(expires, who.expires_at)
    secret = SESSION_PREFIX + secrets.token_urlsafe(32)
    record = BrowserSession(session_hash=tokens.hash_token(secret), token_hash=who.token_hash, user_id=who.user,
                            created_at=now, expires_at=expires)
    store.create_session(record)
    return secret, record


def resume(store: TaskStore, secret: str, now: datetime | None = None) -> Identity:
    """The identity behind a session cookie, or :class:`AuthError` when the session is unknown, ended or
    expired, or its token was revoked or expired."""
    now = now or utcnow()
    if not secret.startswith(SESSION_PREFIX) or len(secret) > 100:
        raise AuthError(_ENDED)
    record = store.get_session(tokens.hash_token(secret))
    if record is None or now >= record.expires_at:
        raise AuthError(_ENDED)
    token = store.get_token(record.token_hash)
    if token is None:
        store.delete_session(record.session_hash)
        raise AuthError(_ENDED)
    try:
        return tokens.accept(store, token, now)
    except AuthError:
        store.delete_session(record.session_hash)
        raise


def end(store: TaskStore, secret: str) -> bool:
    """Delete a session (sign-out); False if there was none."""
    return store.delete_session(tokens.hash_token(secret))


def seconds_left(record: BrowserSession, now: datetime | None = None) -> int:
    """How long the session's cookie should live."""
    return max(1, int((record.expires_at - (now or utcnow())).total_seconds()))
