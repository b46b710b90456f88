"""Issue 23, the master's side: what one user (or one client) can no longer take from everyone. Each test runs a
real `cloudai server` on real Redis and a SQLite store, with two users and an admin, and failed on the code
before: live-log followers shared one Redis reader per task and a per-user cap, a request rate per token,
deadlines on slow requests and a cap on connections, no service address in any error, the workers list without
other users' load, browser sessions that are not the token, and throttled, recorded failed sign-ins.

Log lines are written with the worker's own log writer (:class:`cloudai.logs.LogBus`) for tasks queued on a
worker nobody runs, so no container is needed and the lines come exactly when the test writes them."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis

from cloudai import tokens
from cloudai.cli.remote import parse_sse
from cloudai.logs import LogBus
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.e2e.conftest import Masters
from tests.helpers import ROOT, ServerProc, cloudai, register, wait_for
from tests.services import TEST_IMAGE

Serve = Callable[..., ServerProc]


@pytest.fixture
def serve(settings: Settings, store: SQLiteStore, masters: Masters) -> Serve:
    """``serve(CLOUDAI_X="1", ...)``: a real `cloudai server` with these settings (stopped after the test), and a
    registered worker whose queue nobody consumes (tasks stay queued; no Docker needed)."""

    def start(settings_: Settings = settings, **env: str) -> ServerProc:
        register(store, settings_.worker_id, cpus=8, slots=16)
        return masters(settings_, **env)

    return start


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def submit(server: ServerProc, token: str, **fields: Any) -> str:
    r = httpx.post(f"{server.url}/v1/tasks", json={"image": TEST_IMAGE, "command": "true", "memory": "64m", **fields},
                   headers=bearer(token), timeout=30)
    assert r.status_code == 201, r.text
    return str(r.json()["task_id"])


def write_lines(bus: LogBus, task_id: str, texts: list[str], per_entry: int = 100) -> None:
    """Lines into the task's live log as its worker writes them: one stream entry per ``per_entry`` lines."""
    writer = bus.writer(task_id)
    for at in range(0, len(texts), per_entry):
        writer.add_many([(text, "") for text in texts[at:at + per_entry]])
        writer.flush()


def blocked_readers(client: redis.Redis) -> int:
    """Redis connections waiting in ``XREAD BLOCK`` now."""
    return sum(1 for c in client.client_list() if c.get("cmd") == "xread" and "b" in c.get("flags", ""))


def raw_follower(server: ServerProc, token: str, task_id: str) -> socket.socket:
    """A follower that reads its response head and then nothing more (a slow client): its tiny receive buffer
    soon fills, and the server's writes to it wait."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(60)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(f"GET /v1/tasks/{task_id}/logs?follow=true&batch=json HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n".encode())
    head = sock.recv(12)
    assert head == b"HTTP/1.1 200", head
    return sock


class SSEFollower(threading.Thread):
    """Follows a task's log over SSE (``?batch=json``) on a thread, keeping every line and the end event;
    ``pause`` holds its reading until set."""

    def __init__(self, server: ServerProc, token: str, task_id: str, pause: threading.Event | None = None) -> None:
        super().__init__(daemon=True)
        self.url = f"{server.url}/v1/tasks/{task_id}/logs"
        self.token = token
        self.pause = pause
        self.connected = threading.Event()
        self.first_batch = threading.Event()
        self.seqs: list[int] = []
        self.lines: list[str] = []
        self.end: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("GET", self.url, params={"follow": "true", "batch": "json"},
                              headers={**bearer(self.token), "Accept": "text/event-stream"}, timeout=120) as r:
                assert r.status_code == 200, r.read()
                self.connected.set()
                for event in parse_sse(r.iter_raw()):
                    if event.kind == "lines":
                        batch = json.loads(event.data[0])
                        self.seqs += range(batch["first"], batch["first"] + len(batch["lines"]))
                        self.lines += batch["lines"]
                        self.first_batch.set()
                        if self.pause is not None:
                            self.pause.wait(120)
                    elif event.kind == "end":
                        self.end = json.loads(event.data[0])
                        return
                    elif event.kind == "error":
                        raise AssertionError(f"event: error {event.data}")
        except BaseException as exc:  # seen by the test
            self.error = exc

    def result(self) -> tuple[list[int], list[str], dict[str, Any] | None]:
        self.join(180)
        assert not self.is_alive(), "the follower did not reach the end of the log"
        if self.error is not None:
            raise self.error
        return self.seqs, self.lines, self.end


# -- 1. live-log fan-out ----------------------------------------------------------------------------------------
PAD = "x" * 500  # the noisy task's lines are long: far more than socket buffers and the feed's memory hold


@pytest.mark.timeout(300)
def test_300_followers_of_one_user_share_one_reader_and_another_users_follower_gets_every_line(
        serve: Serve, settings: Settings, redis_client: redis.Redis) -> None:
    server = serve(CLOUDAI_FOLLOWERS_PER_USER="301")
    ana, bo = server.token("ana"), server.token("bo")
    noisy, quiet = submit(server, ana), submit(server, bo)
    bus = LogBus.from_url(settings.redis_url)
    write_lines(bus, noisy, [f"ana {i} {PAD}" for i in range(1, 11)])

    # one of ana's followers reads one batch, then stops reading while her task writes far past what the
    # feed keeps in memory: it must then catch up from Redis with no gap and no duplicate
    paused = threading.Event()
    slow = SSEFollower(server, ana, noisy, pause=paused)
    slow.start()
    assert slow.first_batch.wait(60), slow.error
    followers = [raw_follower(server, ana, noisy) for _ in range(300)]  # and 300 that never read at all
    try:
        over = httpx.get(f"{server.url}/v1/tasks/{noisy}/logs", params={"follow": "true"},
                         headers={**bearer(ana), "Accept": "text/event-stream"}, timeout=30)
        assert over.status_code == 429 and 1 <= int(over.headers["retry-after"]) <= 60
        assert over.json()["error"]["type"] == "TooManyRequests"
        assert "CLOUDAI_FOLLOWERS_PER_USER=301" in over.json()["error"]["message"]
        bos = SSEFollower(server, bo, quiet)
        bos.start()
        assert bos.connected.wait(60), bos.error
        # 301 followers of ana's task and one of bo's, all waiting for lines: Redis sees one waiting reader
        # per task (each follower had its own XREAD BLOCK before, on a pool of 100 connections)
        readers = []
        for _ in range(40):
            readers.append(blocked_readers(redis_client))
            time.sleep(0.05)
        assert 1 <= max(readers) <= 2, readers

        def noise() -> None:  # ana's task prints 70,000 long lines (35 MB) while bo follows his
            for n in range(10, 70_010, 100):
                write_lines(bus, noisy, [f"ana {i} {PAD}" for i in range(n + 1, n + 101)])

        noisy_writer = threading.Thread(target=noise, daemon=True)
        noisy_writer.start()
        expected = [f"bo {i}" for i in range(1, 3001)]
        for at in range(0, len(expected), 300):
            write_lines(bus, quiet, expected[at:at + 300], per_entry=50)
        bus.end(quiet, "completed", 0)
        seqs, lines, end = bos.result()
        assert lines == expected and seqs == list(range(1, 3001))  # every line once, in order
        assert end == {"status": "completed", "exit_code": 0, "reason": None}
        noisy_writer.join(120)
        assert bus.last_entry(noisy)[0] == 70_010
        bus.end(noisy, "completed", 0)
        paused.set()
        seqs, lines, end = slow.result()
        assert seqs == list(range(1, 70_011))
        assert all(line == f"ana {i} {PAD}" for i, line in enumerate(lines, 1))
        assert end is not None and end["status"] == "completed"
    finally:
        for sock in followers:
            sock.close()

    def follows_again() -> bool:  # the followers' places are given back when they go
        r = httpx.get(f"{server.url}/v1/tasks/{noisy}/logs", params={"follow": "true", "after": "70010"},
                      headers={**bearer(ana), "Accept": "text/event-stream"}, timeout=30)
        return r.status_code == 200 and "event: end" in r.text

    wait_for(follows_again, 60, 0.2, "ana's closed followers to be released")


# -- 2. request rate per token ----------------------------------------------------------------------------------
def test_a_burst_past_the_tokens_rate_is_429_with_retry_after_and_other_tokens_are_unaffected(serve: Serve) -> None:
    server = serve(CLOUDAI_API_READ_RATE="0.5", CLOUDAI_API_READ_BURST="5", CLOUDAI_API_WRITE_RATE="0.5",
                   CLOUDAI_API_WRITE_BURST="2")
    ana, bo = server.token("ana"), server.token("bo")
    http = httpx.Client(base_url=server.url, timeout=30)
    codes = [http.get("/v1/whoami", headers=bearer(ana)).status_code for _ in range(8)]
    assert codes[:5] == [200] * 5 and 429 in codes[5:], codes
    refused = http.get("/v1/tasks", headers=bearer(ana))
    assert refused.status_code == 429
    wait = int(refused.headers["retry-after"])
    assert 1 <= wait <= 2
    error = refused.json()["error"]
    assert error["type"] == "TooManyRequests" and "0.5 a second" in error["message"]
    assert http.get("/v1/whoami", headers=bearer(bo)).json()["user"] == "bo"  # another token: its own bucket
    # writes have their own bucket: ana's reads are spent, her submits are not
    assert [http.post("/v1/tasks", json={"image": TEST_IMAGE, "memory": "64m"}, headers=bearer(ana)).status_code
            for _ in range(3)] == [201, 201, 429]
    time.sleep(wait)  # what the server said to wait
    assert http.get("/v1/whoami", headers=bearer(ana)).status_code == 200


# -- 3. slow clients --------------------------------------------------------------------------------------------
def _closed_by_server(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's timeout bounds the wait)."""
    got = b""
    while chunk := sock.recv(4096):
        got += chunk
    return got


def test_slow_partial_requests_are_closed_and_other_clients_served(serve: Serve) -> None:
    server = serve(CLOUDAI_SERVER_HEADER_TIMEOUT="2", CLOUDAI_SERVER_BODY_TIMEOUT="2")
    token = server.token("ana")
    slow = []
    for i in range(40):  # half a request line, or a head without its end
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
        sock.sendall(b"GET /v1/who" if i % 2 else b"GET /v1/whoami HTTP/1.1\r\nHost: x\r\nX-Slow: 1")
        slow.append(sock)
    body = socket.create_connection(("127.0.0.1", server.port), timeout=60)  # a head, then too little body
    body.sendall(f"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                 "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"image\"".encode())
    kept = socket.create_connection(("127.0.0.1", server.port), timeout=60)  # kept alive, then half a request
    kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    first = b""
    while b'"ok"' not in first:
        first += kept.recv(4096)
    kept.sendall(b"GET /healthz HTTP/1.1\r\nHo")
    try:
        r = httpx.get(f"{server.url}/v1/whoami", headers=bearer(token), timeout=30)  # others are served meanwhile
        assert r.status_code == 200 and r.json()["user"] == "ana"
        for sock in [*slow, kept]:
            assert _closed_by_server(sock).startswith(b"HTTP/1.1 408 Request Timeout")
        assert b"201 Created" not in _closed_by_server(body)  # closed; nothing was submitted
        assert "did not arrive within 2 s" in server.log()
    finally:
        for sock in [*slow, body, kept]:
            sock.close()
    assert httpx.get(f"{server.url}/v1/tasks", headers=bearer(token), timeout=30).json() == []


def test_connections_past_the_cap_get_503_until_slow_ones_are_closed(serve: Serve) -> None:
    server = serve(CLOUDAI_SERVER_MAX_CONNECTIONS="20", CLOUDAI_SERVER_HEADER_TIMEOUT="3")
    slow = [socket.create_connection(("127.0.0.1", server.port), timeout=60) for _ in range(25)]
    for sock in slow:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
    try:
        busy = httpx.get(f"{server.url}/healthz", timeout=30)
        assert busy.status_code == 503  # uvicorn's limit_concurrency: the cap holds
        for sock in slow:
            assert _closed_by_server(sock).startswith(b"HTTP/1.1 408")
    finally:
        for sock in slow:
            sock.close()
    wait_for(lambda: httpx.get(f"{server.url}/healthz", timeout=30).status_code == 200, 30, 0.1,
             "the server to serve again once the slow connections are gone")


# -- 4. no service address in user-visible errors ---------------------------------------------------------------
def test_no_redis_address_in_sse_errors_503_bodies_or_health(serve: Serve, settings: Settings, own_redis) -> None:  # type: ignore[no-untyped-def]
    private = dataclasses.replace(settings, redis_url=own_redis.url)
    server = serve(private, CLOUDAI_FOLLOW_RECONNECT="2")
    ana = server.token("ana")
    task_id = submit(server, ana)
    follower = SSEFollower(server, ana, task_id)
    follower.start()
    assert follower.connected.wait(60)
    own_redis.stop()
    follower.join(120)
    assert isinstance(follower.error, AssertionError) and "event: error" in str(follower.error)
    shown = [str(follower.error)]
    r = httpx.post(f"{server.url}/v1/tasks", json={"image": TEST_IMAGE}, headers=bearer(ana), timeout=30)
    assert r.status_code == 503 and r.json()["error"]["type"] == "RedisUnavailable", r.text
    assert "can't reach its Redis" in r.json()["error"]["message"]
    shown.append(r.text)
    follow = httpx.get(f"{server.url}/v1/tasks/{task_id}/logs", headers=bearer(ana), timeout=60)
    shown += [follow.text, httpx.get(f"{server.url}/healthz", timeout=30).text]
    address = f"127.0.0.1:{own_redis.port}"
    for text in shown:
        assert "redis://" not in text and address not in text and str(own_redis.port) not in text, text
    assert f"redis://{address}" in server.log()  # the operator's log has it


# -- 5. the workers list ----------------------------------------------------------------------------------------
def test_a_user_sees_workers_capacity_and_room_and_only_their_own_use(serve: Serve, settings: Settings) -> None:
    server = serve()
    ana, bo, root = server.token("ana"), server.token("bo"), server.token("root", admin=True)
    anas = submit(server, ana, cpus=3, memory="1g")
    submit(server, bo, cpus=1, memory="64m")
    submit(server, bo, cpus=0.5, memory="64m")
    http = httpx.Client(base_url=server.url, timeout=30)
    [as_bo] = http.get("/v1/workers", headers=bearer(bo)).json()
    assert (as_bo["used_cpus"], as_bo["used_memory"], as_bo["tasks"]) == (1.5, 128 * 2**20, 2)  # his own only
    assert as_bo["usage_of"] == "bo" and as_bo["has_room"] is True and "claimed_by" not in as_bo
    assert (as_bo["cpus"], as_bo["slots"], as_bo["state"]) == (8, 16, "active")  # the capacity
    assert "ana" not in json.dumps(as_bo) and anas not in json.dumps(as_bo)
    [as_root] = http.get("/v1/workers", headers=bearer(root)).json()
    assert (as_root["used_cpus"], as_root["tasks"], as_root["usage_of"]) == (4.5, 3, None)  # admins: everyone's
    assert "claimed_by" in as_root
    shown = subprocess.run(cloudai("workers"), cwd=ROOT, env=server.cli_env(bo), capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0 and "CPUS (YOURS)" in shown.stdout and "1.5/8" in shown.stdout, shown.stderr


# -- 6. browser sessions ----------------------------------------------------------------------------------------
def test_the_browser_cookie_is_a_session_that_logout_and_revocation_end(serve: Serve, store: SQLiteStore) -> None:
    server = serve()
    token = server.token("ana")
    http = httpx.Client(base_url=server.url, timeout=30)
    r = http.post("/login", data={"token": token})
    assert r.status_code == 200
    session = r.cookies["cloudai_session"]
    assert session != token and token not in str(r.headers) and session.startswith("cas_")
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("cloudai_session="))
    assert 43000 <= int(cookie.split("Max-Age=")[1].split(";")[0]) <= 43200  # 12 hours by default
    assert store.get_session(tokens.hash_token(session)) is not None
    as_cookie = httpx.Client(base_url=server.url, timeout=30, cookies={"cloudai_session": session})
    assert as_cookie.get("/v1/whoami").json()["user"] == "ana"
    refused = as_cookie.post("/v1/tasks", json={"image": TEST_IMAGE})  # CSRF as before: the header is needed
    assert refused.status_code == 403 and "X-CSRF-Token" in refused.json()["error"]["message"]
    allowed = as_cookie.post("/v1/tasks", json={"image": TEST_IMAGE, "memory": "64m"},
                             headers={"X-CSRF-Token": r.cookies["cloudai_csrf"]})
    assert allowed.status_code == 201
    assert http.post("/logout").status_code == 200
    ended = as_cookie.get("/v1/whoami")  # the old cookie, kept by a copy: ended on the server
    assert ended.status_code == 401 and "sign in again" in ended.json()["error"]["message"]

    second = http.post("/login", data={"token": token}).cookies["cloudai_session"]
    again = httpx.Client(base_url=server.url, timeout=30, cookies={"cloudai_session": second})
    assert again.get("/v1/whoami").status_code == 200
    revoke = subprocess.run(cloudai("admin", "token", "revoke", token[:12]), cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "CLOUDAI_STORE_URL": store.url}, timeout=60)
    assert revoke.returncode == 0, revoke.stderr
    assert again.get("/v1/whoami").status_code == 401
    assert store.get_session(tokens.hash_token(second)) is None


# -- 7. failed sign-ins -----------------------------------------------------------------------------------------
def test_failed_sign_ins_are_throttled_per_address_and_recorded(serve: Serve) -> None:
    server = serve()
    token, root = server.token("ana"), server.token("root", admin=True)
    http = httpx.Client(base_url=server.url, timeout=30)
    guesser = {"X-Forwarded-For": "203.0.113.7"}  # as a trusted proxy (127.0.0.1) says who the client is
    for _ in range(10):
        r = http.get("/v1/whoami", headers={**guesser, **bearer(tokens.new_secret())})
        assert r.status_code == 401
    for attempt in (http.get("/v1/whoami", headers={**guesser, **bearer(token)}),  # even the right token
                    http.post("/login", data={"token": token}, headers=guesser)):
        assert attempt.status_code == 429, attempt.text
        assert 1 <= int(attempt.headers["retry-after"]) <= 60
        assert "too many failed sign-ins from 203.0.113.7" in attempt.json()["error"]["message"]
    elsewhere = http.get("/v1/whoami", headers={"X-Forwarded-For": "203.0.113.8", **bearer(token)})
    assert elsewhere.json()["user"] == "ana"  # another address is not held up
    for _ in range(10):  # bad tokens on the login form count the same
        assert http.post("/login", data={"token": "cai_" + "x" * 43}, headers={"X-Forwarded-For": "203.0.113.9"}
                         ).status_code == 401
    assert http.post("/login", data={"token": token}, headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 429
    assert server.log().count("sign-in failed from 203.0.113.7") == 10
    report = http.get("/v1/admin/sign-in-failures", headers=bearer(root)).json()
    assert report["total"] == 20
    rows = {row["address"]: row for row in report["addresses"]}
    assert rows["203.0.113.7"]["recent_failures"] == 10 and rows["203.0.113.7"]["throttled_for_s"] > 0
    assert http.get("/v1/admin/sign-in-failures", headers=bearer(token)).status_code == 403
