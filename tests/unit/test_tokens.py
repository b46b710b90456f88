"""Token parsing and hashing (no store)."""

from __future__ import annotations

import hashlib

import pytest

from cloudai import tokens
from cloudai.errors import ValidationError


def test_new_tokens_are_long_random_and_well_formed() -> None:
    a, b = tokens.new_secret(), tokens.new_secret()
    assert a != b
    assert tokens.looks_like_token(a)
    assert len(a) - len(tokens.TOKEN_PREFIX) >= 43  # 32 bytes in URL-safe base64: 256 bits
    assert tokens.display_prefix(a) == a[:12]


def test_hash_is_sha256_hex() -> None:
    assert tokens.hash_token("cai_x") == hashlib.sha256(b"cai_x").hexdigest()


@pytest.mark.parametrize("text", ["", "cai_", "cai_short", "Bearer cai_" + "a" * 43, "cai_" + "a" * 42 + "!"])
def test_malformed_tokens_are_refused(text: str) -> None:
    assert not tokens.looks_like_token(text)


@pytest.mark.parametrize("user", ["", "two words", "x" * 65])
def test_create_refuses_bad_user_names(user: str) -> None:
    with pytest.raises(ValidationError):
        tokens.create(None, user)  # type: ignore[arg-type]  # refused before the store is used


def test_create_refuses_bad_expiry() -> None:
    with pytest.raises(ValidationError):
        tokens.create(None, "ana", expires="soon")  # type: ignore[arg-type]
