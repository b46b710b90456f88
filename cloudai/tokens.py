"""API tokens: who a request to the master comes from.

A token is ``cai_`` + 43 URL-safe characters (32 random bytes, 256 bits). It is shown once, when created;
the store keeps only its SHA-256 (a random secret this long needs no slow password hash), a display prefix
(``cai_`` + its first 8 characters) that ``token list`` shows and ``token revoke`` takes, the owner, the role
(``admin`` or ``user``), the expiry, the last use and a revoked flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from cloudai.errors import AuthError, ValidationError
from cloudai.models import as_utc, next_created_at, parse_duration, utcnow

if TYPE_CHECKING:
    from cloudai.store.base import TaskStore

TOKEN_PREFIX = "cai_"
PREFIX_LEN = len(TOKEN_PREFIX) + 8
ROLES = ("user", "admin")
TOUCH_EVERY_S = 60.0  # last use is written at most once a minute per token: no store write per request
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_ASK = "ask an admin for a new one (`cloudai admin token create USER`), then `cloudai login`"


@dataclass
class ApiToken:
    """A stored token (never the secret itself)."""

    token_hash: str
    prefix: str
    user_id: str
    role: str = "user"
    created_at: datetime = field(default_factory=utcnow)
    expires_at: datetime | None = None
    last_used_at: datetime | None = None
    revoked: bool = False

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def to_doc(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> ApiToken:
        names = cls.__dataclass_fields__
        data = {k: v for k, v in doc.items() if k in names}
        for key in ("created_at", "expires_at", "last_used_at"):
            data[key] = as_utc(data.get(key))
        data["revoked"] = bool(data.get("revoked"))
        return cls(**data)


@dataclass(frozen=True)
class Identity:
    """Who a request comes from, as its token says."""

    user: str
    admin: bool
    prefix: str = ""
    expires_at: datetime | None = None  # the token's expiry (a browser session never outlives it)
    token_hash: str = field(default="", repr=False)  # which token: its rate limit and its browser sessions


def hash_token(token: str) -> str:
    """The hex SHA-256 the store keeps."""
    import hashlib  # here: OpenSSL's hashlib, which a command in direct mode never needs (~3 ms)

    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def looks_like_token(token: str) -> bool:
    body = token[len(TOKEN_PREFIX):]
    return token.startswith(TOKEN_PREFIX) and len(body) >= 22 and set(body) <= _TOKEN_CHARS


def display_prefix(token: str) -> str:
    return token[:PREFIX_LEN]


def new_secret() -> str:
    """A fresh token: 256 random bits."""
    import secrets  # here: it imports random, which no other command needs

    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def create(store: TaskStore, user: str, admin: bool = False, expires: str | None = None) -> tuple[str, ApiToken]:
    """Record a new token for ``user`` and return ``(secret, record)``; the secret is never stored."""
    user = user.strip()
    if not user or len(user) > 64 or any(c.isspace() or not c.isprintable() for c in user):
        raise ValidationError("user", user, "use a user name of 1 to 64 characters without spaces")
    lifetime = parse_duration(expires) if expires else None
    if lifetime is not None and lifetime <= 0:
        raise ValidationError("expires", expires, "use a positive duration such as 90d or 12h")
    secret = new_secret()
    now = next_created_at()  # strictly increasing here: `token list` shows tokens in creation order
    record = ApiToken(
        token_hash=hash_token(secret), prefix=display_prefix(secret), user_id=user,
        role="admin" if admin else "user", created_at=now,
        expires_at=now + timedelta(seconds=lifetime) if lifetime is not None else None,
    )
    store.create_token(record)
    return secret, record


def verify(store: TaskStore, token: str | None, now: datetime | None = None) -> Identity:
    """The identity of a presented token; :class:`AuthError` saying which problem (missing, unknown, revoked,
    expired) and what to do. Records the last use (at most once a minute)."""
    if not token:
        raise AuthError("no API token: run `cloudai login URL` (or set CLOUDAI_TOKEN) with the token an admin "
                        "created for you with `cloudai admin token create USER`")
    token = token.strip()
    if not looks_like_token(token):
        raise AuthError("that is not a CloudAI API token (they start with cai_); check CLOUDAI_TOKEN or run "
                        "`cloudai login` again with the token you were given")
    record = store.get_token(hash_token(token))
    if record is None:
        raise AuthError(f"unknown API token {display_prefix(token)}...: check CLOUDAI_TOKEN or the file written by "
                        f"`cloudai login`, or {_ASK}")
    return accept(store, record, now)


def accept(store: TaskStore, record: ApiToken, now: datetime | None = None) -> Identity:
    """The identity of a stored token (the one a browser session is bound to, or a presented one), unless it
    was revoked or expired (:class:`AuthError`). Records the last use (at most once a minute)."""
    now = now or utcnow()
    if record.revoked:
        raise AuthError(f"API token {record.prefix}... was revoked; {_ASK}")
    if record.expired(now):
        assert record.expires_at is not None
        raise AuthError(f"API token {record.prefix}... expired at {record.expires_at:%Y-%m-%d %H:%M} UTC; {_ASK}")
    if record.last_used_at is None or (now - record.last_used_at).total_seconds() >= TOUCH_EVERY_S:
        store.touch_token(record.token_hash, now)
    return Identity(record.user_id, record.admin, record.prefix, record.expires_at, record.token_hash)


def revoke(store: TaskStore, prefix: str) -> ApiToken:
    """Revoke the one token whose display prefix starts with ``prefix`` (at least ``cai_`` + 4 characters)."""
    prefix = prefix.strip().rstrip(".")
    if not prefix.startswith(TOKEN_PREFIX) or len(prefix) < len(TOKEN_PREFIX) + 4:
        raise ValidationError("token prefix", prefix, "give the prefix `cloudai admin token list` shows, "
                              "such as cai_Ab12Cd34")
    wanted = prefix[:PREFIX_LEN]  # a whole token works too
    matches = [t for t in store.list_tokens() if t.prefix.startswith(wanted)]
    if not matches:
        raise ValidationError("token prefix", prefix, "no token has it; `cloudai admin token list` shows them")
    if len(matches) > 1:
        raise ValidationError("token prefix", prefix, f"{len(matches)} tokens have it; give more characters")
    store.revoke_token(matches[0].token_hash)
    store.delete_sessions(matches[0].token_hash)  # its browser sessions end now (each use checks it anyway)
    matches[0].revoked = True
    return matches[0]
