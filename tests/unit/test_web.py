"""The web pages and CSRF rules on the app in-process (the store is SQLite; no Redis is needed for these paths).
The browser tests in tests/e2e/test_web_browser.py drive the same pages in Chromium on real services."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cloudai import tokens
from cloudai.models import Task
from cloudai.server import create_app, csrf
from cloudai.settings import Settings


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    settings = Settings(store_url=f"sqlite:///{tmp_path / 's.db'}", redis_url="redis://127.0.0.1:1/0")
    return TestClient(create_app(settings), follow_redirects=False)


def _secret(client: TestClient, user: str, admin: bool = False) -> str:
    return tokens.create(client.app.state.cloud.store, user, admin)[0]  # type: ignore[attr-defined]


def _task(client: TestClient, user: str, **fields: object) -> Task:
    task = Task(task_id=f"t-{user}", user_id=user, docker_image="busybox", **fields)  # type: ignore[arg-type]
    client.app.state.cloud.store.create_task(task)  # type: ignore[attr-defined]
    return task


def _sign_in(client: TestClient, secret: str) -> str:
    r = client.post("/login", data={"token": secret}, headers={"Origin": "http://testserver"})
    assert r.status_code == 200, r.text
    return client.cookies["cloudai_csrf"]


def test_pages_send_a_signed_out_browser_to_the_sign_in_page(client: TestClient) -> None:
    for path in ("/", "/workers", "/submit", "/tasks/t-x"):
        r = client.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/login?next=%2F"), path
    page = client.get("/login?next=//evil.example/x")
    assert page.status_code == 200 and 'name="next" value="/"' in page.text  # never a redirect off the server
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/app.css").status_code == 200


def test_login_sets_a_readable_csrf_cookie_bound_to_the_session_and_logout_clears_it(client: TestClient) -> None:
    secret = _secret(client, "ana")
    value = _sign_in(client, secret)
    session = client.cookies["cloudai_session"]
    assert session.startswith("cas_") and session != secret and secret not in session  # never the token
    assert value == csrf.token_for(session) and secret not in value
    page = client.get("/")
    assert page.status_code == 200 and f'<meta name="csrf-token" content="{value}">' in page.text
    r = client.post("/logout", headers={"Origin": "http://testserver"})
    assert r.status_code == 200 and 'cloudai_csrf=""' in ",".join(r.headers.get_list("set-cookie"))


def test_cookie_authenticated_unsafe_requests_need_the_csrf_header(client: TestClient) -> None:
    secret = _secret(client, "ana")
    value = _sign_in(client, secret)
    _task(client, "ana")
    for headers in ({}, {"X-CSRF-Token": "0" * 64}, {"X-CSRF-Token": csrf.token_for(_secret(client, "ana"))}):
        r = client.post("/v1/tasks/t-ana/cancel?wait=false", headers=headers)
        assert r.status_code == 403 and "X-CSRF-Token" in r.json()["error"]["message"], headers
        assert client.post("/v1/tasks", json={"image": "busybox"}, headers=headers).status_code == 403
        assert client.delete("/v1/workers/w1", headers=headers).status_code == 403
    assert client.get("/v1/tasks/t-ana").json()["status"] == "pending"  # nothing happened
    assert client.get("/v1/tasks").status_code == 200  # safe methods need none
    # with the value: past CSRF (then the usual rules: a user may not remove workers)
    assert client.delete("/v1/workers/w1", headers={"X-CSRF-Token": value}).status_code == 403
    r = client.post("/v1/tasks", json={"image": "busybox", "cpus": "lots"}, headers={"X-CSRF-Token": value})
    assert r.status_code == 422 and r.json()["error"]["message"].startswith("invalid cpus 'lots'")
    # a Bearer request is not a browser's: no CSRF value needed
    client.cookies.clear()
    bearer = {"Authorization": f"Bearer {secret}"}
    assert client.post("/v1/tasks", json={"image": "busybox", "cpus": "lots"}, headers=bearer).status_code == 422


@pytest.mark.parametrize("headers, status", [
    ({"Origin": "http://evil.example"}, 403), ({"Origin": "null"}, 403),
    ({"Referer": "http://evil.example/page"}, 403), ({"Origin": "http://testserver"}, 200),
    ({"Referer": "http://testserver/login"}, 200), ({}, 200),  # no Origin nor Referer: not a browser (the CLI)
])
def test_login_refuses_other_origins(client: TestClient, headers: dict[str, str], status: int) -> None:
    r = client.post("/login", data={"token": _secret(client, "ana")}, headers=headers)
    assert r.status_code == status
    assert ("cloudai_session" in client.cookies) == (status == 200)


def test_task_page_follows_the_api_ownership_rule_and_escapes_what_users_typed(client: TestClient) -> None:
    _task(client, "ana", command="echo '<script>alert(1)</script>'", name="<b>bold</b>")
    _sign_in(client, _secret(client, "bo"))
    other = client.get("/tasks/t-ana")
    unknown = client.get("/tasks/t-nobody")
    assert other.status_code == unknown.status_code == 404
    assert other.text.replace("t-ana", "t-nobody") == unknown.text
    _sign_in(client, _secret(client, "ana"))
    page = client.get("/tasks/t-ana")
    assert page.status_code == 200
    assert "<script>alert(1)" not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "<b>bold</b>" not in page.text and "&lt;b&gt;bold&lt;/b&gt;" in page.text
    _sign_in(client, _secret(client, "root", admin=True))
    assert client.get("/tasks/t-ana").status_code == 200  # admins see every task


@pytest.mark.parametrize("value, local", [
    ("/", True), ("/tasks/t1?x=1#y", True), ("//evil.example", False), ("/\\evil.example", False),
    ("/\t/evil.example", False), ("/x\ny", False), ("https://evil.example/", False), ("tasks", False), ("", False),
])
def test_only_local_paths_are_followed_after_sign_in(client: TestClient, value: str, local: bool) -> None:
    assert (csrf.local_path(value) == value) is local
    r = client.post("/login", data={"token": _secret(client, "ana"), "next": value})
    assert (r.status_code, r.headers.get("location")) == ((303, value) if local else (200, None))


def test_a_pending_task_page_says_why_it_waits(client: TestClient) -> None:
    _task(client, "ana", pending_reason="no worker has 64 GPUs free")
    _sign_in(client, _secret(client, "ana"))
    page = client.get("/tasks/t-ana")
    assert page.status_code == 200 and "no worker has 64 GPUs free" in page.text
    assert 'data-field="pending_box" hidden' not in page.text and 'id="cancel" hidden' not in page.text


def test_a_cookie_session_needs_csrf_whatever_authorization_header_comes_with_it(client: TestClient) -> None:
    """An empty or non-Bearer Authorization header (a proxy's Basic auth) neither skips the CSRF check nor
    breaks a cookie session."""
    task = _task(client, "ana")
    _sign_in(client, _secret(client, "ana"))
    for header in ("", "Basic dXNlcjpwYXNz"):
        r = client.post(f"/v1/tasks/{task.task_id}/cancel?wait=false", headers={"Authorization": header})
        assert r.status_code == 403, (header, r.text)
        assert client.get("/v1/whoami", headers={"Authorization": header}).json()["user"] == "ana"
        assert client.get("/", headers={"Authorization": header}).status_code == 200
    assert client.get(f"/v1/tasks/{task.task_id}").json()["status"] == "pending"  # nothing was cancelled


def test_the_login_cookie_never_outlives_its_token_and_goes_once_it_fails(client: TestClient) -> None:
    store = client.app.state.cloud.store  # type: ignore[attr-defined]
    secret, record = tokens.create(store, "ana", False, "1h")
    r = client.post("/login", data={"token": secret}, headers={"Origin": "http://testserver"})
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("cloudai_session="))
    max_age = int(cookie.split("Max-Age=")[1].split(";")[0])
    assert 3500 <= max_age <= 3600
    tokens.revoke(store, record.prefix)
    r = client.get("/v1/whoami")
    assert r.status_code == 401
    assert any(c.startswith('cloudai_session=""') for c in r.headers.get_list("set-cookie"))  # cleared
    page = client.get("/")
    assert page.status_code == 303 and page.headers["location"].startswith("/login")


def test_responses_are_not_cached_or_sniffed_and_health_names_no_address(client: TestClient) -> None:
    r = client.get("/healthz")  # Redis at port 1 is down
    assert r.status_code == 503 and "127.0.0.1" not in r.text and "redis" in r.json()["reason"]
    assert r.headers["cache-control"] == "no-store" and r.headers["x-content-type-options"] == "nosniff"
    secret = _secret(client, "ana")
    r = client.get("/v1/whoami", headers={"Authorization": f"Bearer {secret}"})
    assert r.headers["cache-control"] == "no-store" and r.headers["x-content-type-options"] == "nosniff"


def test_a_last_event_id_beyond_any_log_is_a_usage_error_not_a_hang(client: TestClient) -> None:
    task = _task(client, "ana")
    auth = {"Authorization": f"Bearer {_secret(client, 'ana')}"}
    huge = "99999999999999999999999"
    r = client.get(f"/v1/tasks/{task.task_id}/logs", headers={**auth, "Last-Event-ID": huge,
                                                               "Accept": "text/event-stream"})
    assert r.status_code == 422 and "Last-Event-ID" in r.text
    assert client.get(f"/v1/tasks/{task.task_id}/logs?after={huge}", headers=auth).status_code == 422
