"""The master's error mapping, validation messages and SSE framing, on the app in-process (no Redis needed
for these paths: authentication and body validation come first)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cloudai import tokens
from cloudai.cli.remote import parse_sse
from cloudai.errors import (
    AuthError,
    CloudAIError,
    Forbidden,
    PlacementError,
    RedisUnavailable,
    StoreUnavailable,
    TaskExists,
    TaskNotFound,
    ValidationError,
    WorkerNotFound,
)
from cloudai.logevents import LogEnd, LogLine
from cloudai.models import Resources
from cloudai.server import create_app
from cloudai.server.errors import http_status
from cloudai.server.logstream import sse_events
from cloudai.settings import Settings


@pytest.mark.parametrize("error, status", [
    (AuthError("x"), 401), (Forbidden("x"), 403), (TaskNotFound("t"), 404), (WorkerNotFound("w"), 404),
    (ValidationError("memory", "1k", "x"), 422), (PlacementError("x"), 422), (TaskExists("x"), 409),
    (StoreUnavailable("mongodb://u:secret@h/db", "down"), 503), (RedisUnavailable("redis://:pw@h", "down"), 503),
    (CloudAIError("worker w still holds 1 live task(s)"), 409),
])
def test_http_status_of_each_error(error: CloudAIError, status: int) -> None:
    assert http_status(error) == status


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    settings = Settings(store_url=f"sqlite:///{tmp_path / 's.db'}", redis_url="redis://:secret@127.0.0.1:1/0")
    return TestClient(create_app(settings))


def _token(client: TestClient, user: str = "ana", admin: bool = False) -> dict[str, str]:
    store = client.app.state.cloud.store  # type: ignore[attr-defined]
    return {"Authorization": f"Bearer {tokens.create(store, user, admin)[0]}"}


def test_missing_and_malformed_tokens_are_401_with_what_to_do(client: TestClient) -> None:
    r = client.get("/v1/whoami")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"]["type"] == "AuthError" and "cloudai login" in r.json()["error"]["message"]
    r = client.get("/v1/whoami", headers={"Authorization": "Basic YTpi"})
    assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]


def test_unknown_fields_and_bad_values_are_422_with_the_cli_message(client: TestClient) -> None:
    auth = _token(client)
    r = client.post("/v1/tasks", json={"image": "busybox", "colour": "red"}, headers=auth)
    assert r.status_code == 422
    assert r.json()["error"]["message"] == ("invalid request: colour: unknown field; see /docs for the fields this "
                                            "endpoint takes")
    r = client.post("/v1/tasks", json={"image": "busybox", "memory": "1k"}, headers=auth)
    with pytest.raises(ValidationError) as cli_error:
        Resources.parse(memory="1k")  # what the CLI says for `--memory 1k`
    assert (r.status_code, r.json()["error"]["message"]) == (422, str(cli_error.value))
    assert r.json()["error"]["exit_code"] == 2
    r = client.post("/v1/tasks", json={"image": "busybox", "gpus": True}, headers=auth)  # not "1 GPU"
    assert r.status_code == 422 and "gpus" in r.json()["error"]["message"]


def test_a_body_over_the_limit_is_413(client: TestClient) -> None:
    r = client.post("/v1/tasks", content=b"{" + b" " * (2 * 1024 * 1024) + b"}", headers=_token(client))
    assert r.status_code == 413 and r.json()["error"]["type"] == "PayloadTooLarge"


def test_unreachable_redis_is_503_without_the_password(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 503 and "secret" not in r.text and "Traceback" not in r.text


def test_login_sets_an_httponly_strict_cookie_the_api_accepts(client: TestClient) -> None:
    secret = _token(client, "bo")["Authorization"].split()[1]
    r = client.post("/login", data={"token": "cai_wrong"})
    assert r.status_code == 401
    r = client.post("/login", data={"token": secret})
    cookie = r.headers["set-cookie"].lower()
    assert r.status_code == 200 and "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/v1/whoami").json()["user"] == "bo"
    client.post("/logout")
    assert client.get("/v1/whoami").status_code == 401


def test_sse_framing_and_parsing_round_trip() -> None:
    text = sse_events([LogLine(7, "a"), LogLine(8, " b\x0bc"), LogEnd("failed", 3, "exited with code 3")])
    assert text.startswith("id: 8\ndata: a\ndata:  b\x0bc\n\nevent: end\ndata: ")
    events = list(parse_sse([text.encode()[:5], text.encode()[5:], b": keep-alive\n\n"]))
    assert [(e.kind, e.id, e.data) for e in events[:1]] == [("message", "8", ["a", " b\x0bc"])]
    assert events[1].kind == "end" and json.loads(events[1].data[0]) == {
        "status": "failed", "exit_code": 3, "reason": "exited with code 3"}
    assert events[2].kind == "comment"
