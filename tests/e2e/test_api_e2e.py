"""The master as users meet it: a real `cloudai server` process, tokens of two users and an admin, the CLI in
API mode, and Server-Sent Events followed through a dropped connection."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import redis

from cloudai import keys
from cloudai.lines import MAX_LINE_BYTES, cut_mark
from cloudai.models import TaskStatus
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.helpers import ROOT, ServerProc, cloudai, register, wait_ended, wait_for
from tests.services import TEST_IMAGE, free_port

S = TaskStatus


def cli(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cloudai(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          input=stdin)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def people(api_server: ServerProc, store: SQLiteStore, settings: Settings) -> dict[str, str]:
    """Tokens of ana and bo (users) and root (admin); a registered worker whose queue nobody consumes, so
    tasks wait queued and no Docker is needed."""
    register(store, settings.worker_id)
    return {"ana": api_server.token("ana"), "bo": api_server.token("bo"), "root": api_server.token("root", admin=True)}


def test_users_see_only_their_own_tasks_and_admins_see_all(api_server: ServerProc, people: dict[str, str]) -> None:
    http = httpx.Client(base_url=api_server.url, timeout=30)
    r = http.post("/v1/tasks", json={"image": TEST_IMAGE, "command": "true", "user": "mallory"},
                  headers=auth(people["ana"]))
    assert r.status_code == 201, r.text
    task = r.json()
    task_id = task["task_id"]
    assert task["user_id"] == "ana"  # the token's user, not the one the client named

    unknown = http.get("/v1/tasks/t-does-not-exist", headers=auth(people["bo"])).json()
    as_bo = http.get(f"/v1/tasks/{task_id}", headers=auth(people["bo"]))
    assert as_bo.status_code == 404
    assert as_bo.json() == json.loads(json.dumps(unknown).replace("t-does-not-exist", task_id))
    for method, path, headers in [
        ("GET", f"/v1/tasks/{task_id}/logs", {}),
        ("GET", f"/v1/tasks/{task_id}/logs?follow=true", {"Accept": "text/event-stream"}),
        ("POST", f"/v1/tasks/{task_id}/cancel", {}),
    ]:
        r = http.request(method, path, headers={**auth(people["bo"]), **headers})
        assert r.status_code == 404 and "mallory" not in r.text and "ana" not in r.text, (path, r.text)
    for query in ("", "?user=all", "?user=ana"):
        assert http.get(f"/v1/tasks{query}", headers=auth(people["bo"])).json() == []
    assert [t["task_id"] for t in http.get("/v1/tasks", headers=auth(people["ana"])).json()] == [task_id]

    # the CLI as bo: the same "no task" as for an id that never existed, exit 122
    bo_env = api_server.cli_env(people["bo"])
    status = cli(bo_env, "status", task_id)
    assert status.returncode == 122 and f"no task '{task_id}'" in status.stderr
    assert task_id not in cli(bo_env, "list", "--user", "all", "--json").stdout

    # the admin sees and acts on everything
    root_env = api_server.cli_env(people["root"])
    listing = json.loads(cli(root_env, "list", "--user", "all", "--json").stdout)
    assert [t["task_id"] for t in listing] == [task_id]
    cancel = cli(root_env, "cancel", task_id)
    assert cancel.returncode == 0 and f"{task_id}: cancelled" in cancel.stdout, cancel.stderr
    record = http.get(f"/v1/tasks/{task_id}", headers=auth(people["ana"])).json()
    assert record["status"] == "cancelled" and record["error"]["message"] == "cancelled by root"


def test_worker_administration_is_admin_only(api_server: ServerProc, people: dict[str, str],
                                            settings: Settings, store: SQLiteStore) -> None:
    user = cli(api_server.cli_env(people["ana"]), "workers", "drain", settings.worker_id)
    assert user.returncode == 1 and "an admin token is needed" in user.stderr
    r = httpx.delete(f"{api_server.url}/v1/workers/{settings.worker_id}", headers=auth(people["bo"]))
    assert r.status_code == 403
    assert store.get_worker(settings.worker_id).state.value == "active"  # type: ignore[union-attr]
    admin = cli(api_server.cli_env(people["root"]), "workers", "drain", settings.worker_id)
    assert admin.returncode == 0 and admin.stdout.strip() == f"{settings.worker_id}: draining"
    assert store.get_worker(settings.worker_id).state.value == "draining"  # type: ignore[union-attr]
    listed = json.loads(cli(api_server.cli_env(people["ana"]), "workers", "--json").stdout)
    assert [w["worker_id"] for w in listed] == [settings.worker_id]  # users may look


def test_revoked_expired_and_unknown_tokens_are_401(api_server: ServerProc, people: dict[str, str],
                                                   store: SQLiteStore) -> None:
    from cloudai import tokens

    short = api_server.token("cy", expires="1s")
    assert httpx.get(f"{api_server.url}/v1/whoami", headers=auth(short)).json()["user"] == "cy"
    time.sleep(1.2)
    r = httpx.get(f"{api_server.url}/v1/whoami", headers=auth(short))
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]
    revoke = subprocess.run(cloudai("admin", "token", "revoke", people["bo"][:12]), cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "CLOUDAI_STORE_URL": store.url})
    assert revoke.returncode == 0, revoke.stderr
    result = cli(api_server.cli_env(people["bo"]), "list")
    assert result.returncode == 1 and "was revoked" in result.stderr
    r = httpx.get(f"{api_server.url}/v1/tasks", headers=auth(tokens.new_secret()))
    assert r.status_code == 401 and "unknown API token" in r.json()["error"]["message"]
    assert httpx.get(f"{api_server.url}/v1/tasks").status_code == 401
    assert store.get_token(tokens.hash_token(people["ana"])) is not None  # others still work


def test_login_file_is_private_and_used_then_connection_errors_are_clear(api_server: ServerProc,
                                                                         people: dict[str, str]) -> None:
    env = api_server.cli_env("")
    env.pop("CLOUDAI_API_URL")
    env.pop("CLOUDAI_TOKEN")
    login = cli(env, "login", api_server.url, stdin=people["ana"] + "\n")
    assert login.returncode == 0 and "as ana (user)" in login.stdout, login.stderr
    path = os.path.join(env["XDG_CONFIG_HOME"], "cloudai", "credentials.json")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert cli(env, "whoami").stdout.startswith("ana (user, token cai_")
    bad = cli(env, "login", api_server.url, "--token", "cai_" + "x" * 43)
    assert bad.returncode == 1 and "unknown API token" in bad.stderr
    nowhere = f"http://127.0.0.1:{free_port()}"
    down = cli({**env, "CLOUDAI_API_URL": nowhere, "CLOUDAI_TOKEN": people["ana"]}, "list")
    assert down.returncode == 123 and f"the CloudAI server at {nowhere} can't be reached" in down.stderr


def _sse_lines(response: httpx.Response) -> Iterator[tuple[str, str | None, list[str]]]:
    """(event, id, data lines) of each event, parsed here independently of the CLI's parser."""
    kind, event_id, data = "message", None, []  # type: str, str | None, list[str]
    for line in response.iter_lines():
        if line == "":
            if data:
                yield kind, event_id, data
            kind, event_id, data = "message", None, []
        elif line.startswith(":"):
            yield "comment", None, []
        else:
            name, _, value = line.partition(": ")
            if name == "data":
                data.append(value)
            elif name == "id":
                event_id = value
            elif name == "event":
                kind = value


@pytest.mark.timeout(240)
def test_sse_follow_of_20000_lines_resumes_after_a_dropped_connection(
    api_server: ServerProc, settings: Settings, store: SQLiteStore, workers  # type: ignore[no-untyped-def]
) -> None:
    workers()
    token = api_server.token(settings.user)
    http = httpx.Client(base_url=api_server.url, headers=auth(token), timeout=60)
    script = "i=1; while [ $i -le 20000 ]; do echo line $i; [ $((i % 4000)) = 0 ] && sleep 0.3; i=$((i+1)); done"
    task_id = http.post("/v1/tasks", json={"image": TEST_IMAGE, "command": script}).json()["task_id"]
    url = f"/v1/tasks/{task_id}/logs"
    got: list[str] = []
    last_id = None
    with http.stream("GET", url, params={"follow": "true"}, headers={"Accept": "text/event-stream"}) as first:
        assert first.status_code == 200
        assert first.headers["cache-control"] == "no-cache" and first.headers["x-accel-buffering"] == "no"
        assert first.headers["content-type"].startswith("text/event-stream")
        for kind, event_id, data in _sse_lines(first):
            if kind == "message":
                got += data
                last_id = event_id
                assert last_id == str(len(got))  # id = the seq of the batch's last line
            if len(got) >= 10000:
                break  # drop the connection half-way
    assert last_id is not None
    end = None
    with http.stream("GET", url, params={"follow": "true"},
                     headers={"Accept": "text/event-stream", "Last-Event-ID": last_id}) as second:
        for kind, _event_id, data in _sse_lines(second):
            if kind == "message":
                got += data
            elif kind == "end":
                end = json.loads(data[0])
                break
    assert got == [f"line {i}" for i in range(1, 20001)]  # every line once, in order
    assert end == {"status": "completed", "exit_code": 0, "reason": None}
    # the whole log as text, and ?after= as another way to resume
    assert http.get(url).text.splitlines()[-1] == "line 20000"
    with http.stream("GET", url, params={"after": "19998"}, headers={"Accept": "text/event-stream"}) as tail:
        events = [(k, d) for k, _i, d in _sse_lines(tail) if k != "comment"]
    assert events[0] == ("message", ["line 19999", "line 20000"]) and events[-1][0] == "end"
    # the CLI's format (?batch=json): the same batches, each one JSON object, the same ids to resume after
    for timestamps in ("true", "false"):  # the timestamps only if asked for
        with http.stream("GET", url, params={"after": "19998", "batch": "json", "timestamps": timestamps},
                         headers={"Accept": "text/event-stream", "Last-Event-ID": "19997"}) as tail:
            events = [(k, i, d) for k, i, d in _sse_lines(tail) if k != "comment"]
        assert events[0][:2] == ("lines", "20000") and events[-1][0] == "end"  # Last-Event-ID wins over ?after=
        batch = json.loads(events[0][2][0])
        assert (batch["first"], batch["lines"]) == (19998, ["line 19998", "line 19999", "line 20000"])
        assert len(batch["ts"]) == 3 and all(batch["ts"]) if timestamps == "true" else "ts" not in batch
    assert wait_ended(store, task_id).status == S.COMPLETED


def test_monitor_through_the_api_keeps_header_live_log_and_final_block(
    api_server: ServerProc, settings: Settings, store: SQLiteStore, workers  # type: ignore[no-untyped-def]
) -> None:
    workers()
    env = api_server.cli_env(api_server.token(settings.user))
    task_id = cli(env, "submit", "-q", TEST_IMAGE, "for i in 1 2 3; do echo tick $i; sleep 0.3; done").stdout.strip()
    wait_for(lambda: store.get_task(task_id) is not None, 10)
    result = cli(env, "monitor", task_id)
    out = result.stdout.splitlines()
    assert result.returncode == 0, result.stderr
    assert any(ln.strip().startswith("task:") and task_id in ln for ln in out)
    assert [ln for ln in out if ln.startswith("tick")] == ["tick 1", "tick 2", "tick 3"]
    assert out[-1] == "Task Completed"


def test_awkward_output_arrives_through_the_api_exactly_as_in_direct_mode(
    api_server: ServerProc, settings: Settings, store: SQLiteStore, workers  # type: ignore[no-untyped-def]
) -> None:
    from cloudai.api import CloudAI
    from cloudai.cli.remote import RemoteCloud
    from cloudai.logevents import LogEnd, LogLine
    from cloudai.submission import SubmitRequest

    workers()
    remote = RemoteCloud(api_server.url, api_server.token(settings.user))

    script = ("printf 'bad \\377 byte\\n'; head -c 1048576 /dev/zero | tr '\\0' x; echo; "
              "printf '10%%\\r50%%\\r100%%\\n'; printf 'tab\\tand\\013vt\\n'; echo last")
    task = remote.submit(SubmitRequest(TEST_IMAGE, script))
    followed = [e for batch in remote.follow_batches(task.task_id) for e in batch]
    direct = list(CloudAI(settings).logs(task.task_id))
    assert isinstance(followed[-1], LogEnd) and followed[-1].status == "completed"
    texts = [e.text for e in followed if isinstance(e, LogLine)]
    assert texts == [e.text for e in direct if isinstance(e, LogLine)]
    assert [e.seq for e in followed if isinstance(e, LogLine)] == list(range(1, len(texts) + 1))
    assert texts[0] == "bad \ufffd byte" and texts[-3:] == ["100%", "tab\tand\x0bvt", "last"]
    mark = cut_mark(MAX_LINE_BYTES)  # the 1 MiB line, in 64 KiB pieces, each cut marked
    assert "".join(t.removesuffix(mark) for t in texts[1:-3]) == "x" * 1048576 and texts[1].endswith(mark)


def test_idle_followers_hold_no_server_thread(api_server: ServerProc, people: dict[str, str],
                                             redis_client: redis.Redis) -> None:
    """More idle SSE followers than the server's thread pool has threads (40): they hold no thread and no Redis
    connection of their own (one reader, waiting in ``XREAD BLOCK``, serves all of them), and another request
    is answered meanwhile."""
    import asyncio

    headers = auth(people["ana"])
    task_id = httpx.post(f"{api_server.url}/v1/tasks", json={"image": TEST_IMAGE, "command": "true"},
                         headers=headers).json()["task_id"]  # queued on a worker nobody runs: stays silent

    def blocked_readers() -> int:
        return sum(1 for c in redis_client.client_list() if c.get("cmd") == "xread" and "b" in c.get("flags", ""))

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=api_server.url, headers=headers, timeout=30,
                                     limits=httpx.Limits(max_connections=100)) as http:
            streams = []
            for _ in range(60):
                cm = http.stream("GET", f"/v1/tasks/{task_id}/logs", params={"follow": "true"},
                                 headers={"Accept": "text/event-stream"})
                response = await cm.__aenter__()
                assert response.status_code == 200
                streams.append(cm)
            # the event, not a pause: the task's one reader waits in XREAD; never one per follower
            await asyncio.to_thread(wait_for, lambda: blocked_readers() == 1, 30, 0.05, "the task's reader")
            samples = [blocked_readers() for _ in range(20)]
            assert max(samples) == 1, samples
            r = await http.get("/v1/whoami")  # while they all follow; a starved pool would never answer
            assert r.status_code == 200 and r.json()["user"] == "ana"
            for cm in streams:
                await cm.__aexit__(None, None, None)

    asyncio.run(scenario())


def test_tls_with_the_servers_own_certificate(settings: Settings, store: SQLiteStore, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                           "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                           "-out", str(cert)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    server = ServerProc(settings, store, tmp_path, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                        ca_file=str(cert)).start()
    try:
        assert server.url.startswith("https://")
        env = server.cli_env(server.token("ana"), SSL_CERT_FILE=str(cert))  # a private CA, as users would set it
        who = cli(env, "whoami")
        assert who.returncode == 0 and who.stdout.startswith("ana (user"), who.stderr
        untrusted = cli({k: v for k, v in env.items() if k != "SSL_CERT_FILE"}, "whoami")
        assert untrusted.returncode == 123 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
        plain = cli({**env, "CLOUDAI_API_URL": server.url.replace("https", "http")}, "whoami")
        assert plain.returncode == 123
    finally:
        server.stop()


def test_quota_and_dependencies_through_the_api(api_server: ServerProc, people: dict[str, str],
                                                settings: Settings) -> None:
    # the operator sets ana's quota in direct mode; ana sees it through the API, bo sees only his own
    from tests.helpers import cli_env

    set_quota = cli(cli_env(settings), "admin", "quota", "set", "ana", "--tasks", "1", "--gpus", "0")
    assert set_quota.returncode == 0, set_quota.stderr
    ana = api_server.cli_env(people["ana"])
    shown = json.loads(cli(ana, "quota", "--json").stdout)
    assert shown["user"] == "ana" and shown["quota"]["tasks"] == 1 and shown["quota"]["gpus"] == 0
    peek = json.loads(cli(api_server.cli_env(people["bo"]), "quota", "--json", "--user", "ana").stdout)
    assert peek["user"] == "bo" and peek["quota"]["tasks"] is None  # a user can't read another's quota

    first = cli(ana, "submit", "-q", TEST_IMAGE, "--", "true")
    assert first.returncode == 0, first.stderr
    first_id = first.stdout.strip()
    # over quota (1 task) and after the first: waits pending, with the dependency recorded
    second = cli(ana, "submit", "--json", "--after", first_id, TEST_IMAGE, "--", "true")
    assert second.returncode == 0, second.stderr
    record = json.loads(second.stdout)
    assert record["after"] == [first_id] and record["status"] == "pending"
    # a dependency on someone else's task is a usage error, through the API as in direct mode
    foreign = cli(api_server.cli_env(people["bo"]), "submit", "--after", first_id, TEST_IMAGE, "--", "true")
    assert foreign.returncode == 2 and first_id in foreign.stderr, foreign.stderr


def test_no_other_users_task_id_leaks_through_workers_or_waiting_reasons(api_server: ServerProc,
                                                                          people: dict[str, str]) -> None:
    """The worker (4 CPUs) is kept for ana's waiting task (backfill): bo sees that it waits, not whose task."""
    http = httpx.Client(base_url=api_server.url, timeout=30)

    def submit(who: str, cpus: int) -> dict[str, object]:
        r = http.post("/v1/tasks", json={"image": TEST_IMAGE, "command": "true", "cpus": cpus, "memory": "64m"},
                      headers=auth(people[who]))
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    assert submit("ana", 3)["status"] == "queued"
    waiting = submit("ana", 2)  # 1 CPU free: it waits and keeps the worker's resources for itself
    assert waiting["status"] == "pending"
    bos = submit("bo", 1)  # would fit in the free CPU, but ana's task came first
    assert bos["status"] == "pending" and str(waiting["task_id"]) not in str(bos["pending_reason"])
    assert "waiting behind an earlier task" in str(bos["pending_reason"])
    as_bo = http.get("/v1/workers", headers=auth(people["bo"])).json()
    assert as_bo and all("claimed_by" not in w for w in as_bo) and str(waiting["task_id"]) not in json.dumps(as_bo)
    as_root = http.get("/v1/workers", headers=auth(people["root"])).json()
    assert [w["claimed_by"] for w in as_root] == [waiting["task_id"]]  # admins see it


def test_waiting_cancels_hold_no_server_thread(api_server: ServerProc, people: dict[str, str], store: SQLiteStore,
                                               settings: Settings, redis_client: redis.Redis) -> None:
    """45 cancels of a running task whose (live) worker doesn't answer yet: other users are still served."""
    import threading

    http = httpx.Client(base_url=api_server.url, timeout=60)
    r = http.post("/v1/tasks", json={"image": TEST_IMAGE, "command": "sleep 60", "memory": "64m"},
                  headers=auth(people["ana"]))
    task_id = r.json()["task_id"]
    task = store.get_task(task_id)
    assert task is not None
    assert store.transition(task_id, S.QUEUED, S.RUNNING, execution=task.execution_id)
    stop = threading.Event()

    def heartbeat() -> None:  # the worker looks alive: each cancel waits for it to stop the container
        while not stop.wait(0.3):
            store.heartbeat(settings.worker_id)

    beating = threading.Thread(target=heartbeat, daemon=True)
    beating.start()
    results: list[tuple[int, str]] = []

    def cancel() -> None:
        r = httpx.post(f"{api_server.url}/v1/tasks/{task_id}/cancel", headers=auth(people["ana"]), timeout=60)
        results.append((r.status_code, r.json().get("status")))

    cancels = [threading.Thread(target=cancel, daemon=True) for _ in range(45)]
    # each cancel sets the task's cancel flag once the server has it: Redis tells us of every SET
    with _keyspace_events(redis_client, keys.cancel_flag(task_id), "set") as flag_sets:
        try:
            for thread in cancels:
                thread.start()
            wait_for(lambda: len(flag_sets()) >= 45, 30, 0.05, "45 cancels to reach the server")
            assert http.get("/v1/whoami", headers=auth(people["bo"])).json()["user"] == "bo"
        finally:
            stop.set()
            beating.join(5)
            # the worker "stops the container": every waiting cancel returns
            store.transition(task_id, S.RUNNING, S.CANCELLED, execution=task.execution_id)
            for thread in cancels:
                thread.join(30)
    # every cancel was still waiting when the worker stopped the task, which was after bo was answered: bo did
    # not wait behind any of them (a cancel that had given up waiting would report the task still running)
    assert results == [(200, "cancelled")] * 45


@contextlib.contextmanager
def _keyspace_events(client: redis.Redis, key: str, event: str) -> Iterator[Callable[[], list[str]]]:
    """Redis's keyspace notifications of ``key`` while inside: yields a function that gives the ``event``
    notifications received so far. The server's setting is put back after."""
    before = client.config_get("notify-keyspace-events").get("notify-keyspace-events", "")
    client.config_set("notify-keyspace-events", "K$g")
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe(f"__keyspace@*__:{key}")
    seen: list[str] = []

    def received() -> list[str]:
        while (message := pubsub.get_message(timeout=0)) is not None:
            if message["data"] == event:
                seen.append(message["data"])
        return seen

    try:
        yield received
    finally:
        pubsub.close()
        client.config_set("notify-keyspace-events", before)
