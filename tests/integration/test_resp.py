"""The CLI's Redis client (cloudai.resp) against redis-py on a real Redis: every command it implements answers
with the same values, errors are redis-py's own classes, and it gets through what a command meets (Redis
restarted, a connection killed, a script flushed, a reply slower than the socket timeout)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from cloudai import resp
from cloudai.api import CloudAI, SubmitRequest
from cloudai.logs import LogBus, LogEnd, LogLine
from cloudai.models import Resources, TaskStatus
from cloudai.settings import Settings
from cloudai.store.sqlite import SQLiteStore
from tests.helpers import queued_task, register, run_in_thread, wait_for
from tests.services import PersistentRedis, free_port, missing


def lean(url: str, **kwargs: Any) -> resp.RespClient:
    client = resp.connect(url, **kwargs)
    assert isinstance(client, resp.RespClient)
    return client


def py(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True)


def scenario(c: Any) -> list[Any]:
    """Every command RespClient implements, with the argument forms its callers use; HSET and XADD go through
    the fallback to redis-py (on the lean client), which is itself under test."""
    out: list[Any] = [c.ping()]
    out += [c.set("k", "v", ex=100), c.set("k", "w", nx=True), c.set("k2", 5, px=100_000), c.set("k3", 1.5),
            c.set("k4", b"b\xc3\xa4", xx=True), c.set("k4", "äöü €")]
    out += [c.get("k"), c.get("k4"), c.get("missing"), c.mget(["k", "missing", "k2"]), c.mget("k", "k3")]
    out += [c.exists("k", "k2", "missing"), c.expire("k", 50), c.expire("missing", 5)]
    out += [c.incr("n"), c.incr("n", 5), c.delete("n", "missing"), c.delete("missing")]
    out += [c.sadd("s", "a", "b", "ä"), c.smembers("s"), c.smembers("none")]
    out += [c.hset("h", mapping={"a": "1", "b": "ü"}), c.hget("h", "a"), c.hget("h", "zz"), c.hgetall("h"),
            c.hgetall("none"), sorted(c.hkeys("h")), c.hdel("h", "a", "zz"), c.hkeys("none")]
    out += [c.lpush("l", "x", "y", 3), c.publish("chan", "m")]
    out += [c.xadd("st", {"l": '["a","ü"]', "t": '["t1","t2"]'}, id="1-0"), c.xadd("st", {"end": "1"}, id="2-0")]
    out += [c.xread({"st": "0-0"}, count=1), c.xread({"st": "0-0"}, count=10, block=10),
            c.xread({"st": "2-0"}, block=10), c.xread({"st": "2-0"}), c.xread({"none": "0-0"}, count=5)]
    out += [c.xrevrange("st", count=1), c.xrevrange("st", max="1-0", count=1), c.xrange("st"),
            c.xrange("st", min="2-0"), c.xrange("none")]
    sec, usec = c.time()
    out.append((type(sec), type(usec), abs(sec - time.time()) < 60))
    script = c.register_script("return {KEYS[1], ARGV[1], 3, redis.call('GET', 'k')}")
    out += [script(keys=["key"], args=["a"]), script(args=[1], keys=["x"]), c.eval("return ARGV[1]", 0, "e")]
    pipe = c.pipeline(transaction=False)
    pipe.set("p", "1")
    pipe.get("p")
    pipe.hgetall("h")
    pipe.smembers("s")
    pipe.xrevrange("st", count=1)
    c.register_script("return ARGV[1] .. KEYS[1]")(keys=["k"], args=["in a pipeline "], client=pipe)
    pipe.time()
    replies = pipe.execute()
    out += [replies[:-1], type(replies[-1]), len(replies[-1]), c.pipeline(transaction=False).execute()]
    return out


def test_every_command_answers_as_redis_py_does(redis_url: str) -> None:
    results = []
    for make in (py, lean):
        py(redis_url).flushdb()
        results.append(scenario(make(redis_url)))
    ours, theirs = results[1], results[0]
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a == b and type(a) is type(b), (i, a, b)


def test_errors_are_redis_pys_classes_with_its_messages(redis_url: str) -> None:
    py(redis_url).sadd("set", "a")
    calls: list[Callable[[Any], Any]] = [
        lambda c: c.hget("set", "x"),  # WRONGTYPE
        lambda c: c.evalsha("0" * 40, 0),  # NOSCRIPT
        lambda c: c.execute_command("NOSUCHCOMMAND", "x"),  # ERR
        lambda c: c.xread({"set": "0-0"}),
        lambda c: c.set("k", True),  # refused before it is sent
    ]
    for call in calls:
        caught = []
        for c in (py(redis_url), lean(redis_url)):
            with pytest.raises(redis.RedisError) as info:
                call(c)
            caught.append(info.value)
        assert type(caught[1]) is type(caught[0]) and str(caught[1]) == str(caught[0]), caught
    # an error inside a pipeline is raised after every reply is read, and the commands after it ran
    for c in (py(redis_url), lean(redis_url)):
        pipe = c.pipeline(transaction=False)
        pipe.hget("set", "x")
        pipe.set("after", type(c).__name__)
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            pipe.execute()
        assert c.get("after") == type(c).__name__
        assert c.ping()  # the connection is still in step


def test_a_script_runs_after_redis_forgot_its_scripts_alone_and_in_a_pipeline(redis_url: str) -> None:
    c = lean(redis_url)
    script = c.register_script("return tonumber(ARGV[1]) + 1")
    assert script(args=[1]) == 2
    c.execute_command("SCRIPT", "FLUSH")
    assert script(args=[2]) == 3
    c.execute_command("SCRIPT", "FLUSH")
    pipe = c.pipeline(transaction=False)
    script(args=[3], client=pipe)
    assert pipe.execute() == [4]
    broken = c.register_script("return (")  # does not compile: its EVAL says so
    pipe = c.pipeline(transaction=False)
    broken(client=pipe)
    with pytest.raises(redis.ResponseError, match="(?i)compiling"):
        pipe.execute()
    assert c.ping()


def test_connection_refused_is_redis_pys_connection_error() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    for c in (py(url), lean(url, socket_connect_timeout=2)):
        with pytest.raises(redis.ConnectionError, match="Connection refused"):
            c.ping()


def test_a_reply_slower_than_the_socket_timeout_is_a_timeout_then_the_client_goes_on(redis_url: str) -> None:
    c = lean(redis_url, socket_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        c.xread({"quiet": "$"}, block=3000)
    assert time.monotonic() - started < 2
    assert c.ping() and c.set("after", "1") and c.get("after") == "1"  # a new connection, not the stale reply


def test_a_restarted_redis_and_a_killed_connection_are_reconnected(own_redis: PersistentRedis) -> None:
    c = lean(own_redis.url)
    assert c.set("k", "1")
    own_redis.stop()
    with pytest.raises(redis.ConnectionError):
        c.get("k")
    own_redis.start()
    assert c.get("k") == "1"  # append-only file: the value survived the restart
    assert py(own_redis.url).client_kill_filter(_type="normal", skipme=True) >= 1
    assert c.incr("n") == 1  # the dead connection is replaced once, transparently


def test_password_and_database_from_the_url(tmp_path: Path) -> None:
    server = PersistentRedis(tmp_path, password="s3cr:et")
    server.start()
    try:
        base = f"redis://:s3cr%3Aet@127.0.0.1:{server.port}"
        assert lean(f"{base}/3").set("k", "in db 3")
        assert py(f"{base}/3").get("k") == "in db 3" and py(f"{base}/0").get("k") is None
        assert lean(f"{base}/0?db=3").get("k") == "in db 3"
        assert lean(f"redis://default:s3cr%3Aet@127.0.0.1:{server.port}/3").get("k") == "in db 3"
        for c in (py(f"redis://:wrong@127.0.0.1:{server.port}/0"), lean(f"redis://:wrong@127.0.0.1:{server.port}/0")):
            with pytest.raises(redis.AuthenticationError):
                c.ping()
        with pytest.raises(redis.AuthenticationError):
            lean(f"redis://127.0.0.1:{server.port}/0").get("k")  # NOAUTH
    finally:
        server.stop()


def test_a_unix_socket_url(tmp_path: Path) -> None:
    binary = shutil.which("redis-server") or missing("redis-server is not installed")
    sock = tmp_path / "redis.sock"
    proc = subprocess.Popen([str(binary), "--port", "0", "--unixsocket", str(sock), "--save", "",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(sock.exists, 10, 0.05, "redis-server's socket")
        c = lean(f"unix://{sock}?db=2")
        assert c.path == str(sock) and c.db == 2
        wait_for(lambda: _answers(c), 10, 0.05, "redis-server on its socket")
        assert c.set("k", "v") and py(f"unix://{sock}?db=2").get("k") == "v"
    finally:
        proc.terminate()
        proc.wait(10)


def _answers(c: resp.RespClient) -> bool:
    try:
        return bool(c.ping())
    except redis.ConnectionError:
        return False


def test_urls_it_does_not_speak_get_redis_py() -> None:
    for url in ("rediss://127.0.0.1:6380/0", "redis://127.0.0.1:6379/0?protocol=3", "redis://h/0?ssl_cert_reqs=none",
                "redis://user@h/0", "unix://", "unix:///tmp/r%20s.sock", "redis://h%41/0", "redis://h/\u00b2"):
        assert isinstance(resp.connect(url), redis.Redis), url
    with pytest.raises(ValueError, match="schemes"):  # redis-py's own answer to a scheme it does not know
        resp.connect("REDIS://h/0")
    assert lean("redis://:@127.0.0.1:6390/0").password is None  # an empty password is none, as for redis-py
    c = lean("redis://127.0.0.1:6390/7")
    assert (c.host, c.port, c.db, c.password) == ("127.0.0.1", 6390, 7, None)
    assert resp.redis_db(c) == 7 and resp.redis_db(redis.Redis.from_url("redis://h/5")) == 5


def test_one_client_shared_by_threads_keeps_replies_in_step(redis_url: str) -> None:
    c = lean(redis_url)
    seen: list[int] = []

    def work() -> None:
        for _ in range(200):
            value = c.incr("shared")
            assert isinstance(value, int)
            seen.append(value)
            assert c.get("missing") is None

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(seen) == list(range(1, 1601))


def test_methods_it_lacks_are_redis_pys_on_the_same_database(redis_url: str) -> None:
    c = lean(redis_url)
    with c.lock("a-lock", timeout=5):
        assert py(redis_url).get("a-lock") is not None
    c.hset("h", mapping={"a": "1"})
    assert sorted(c.scan_iter(match="h*")) == ["h"]
    with pytest.raises(AttributeError):
        c._private_name  # noqa: B018


# -- the operations of the CLI on it -------------------------------------------------------------------------

def test_the_clis_submits_place_through_a_flushed_script_and_a_killed_connection(settings: Settings,
                                                                                store: SQLiteStore) -> None:
    api = CloudAI(settings, dispatch=lambda t: None, connect=resp.connect)
    assert isinstance(api.redis, resp.RespClient)
    register(store, "w")
    request = SubmitRequest(image="busybox", command="true", resources=Resources(cpus=0.5, memory=64 << 20))
    assert api.submit(request).status == TaskStatus.QUEUED
    api.redis.execute_command("SCRIPT", "FLUSH")
    assert api.submit(request).status == TaskStatus.QUEUED
    assert py(settings.redis_url).client_kill_filter(_type="normal", skipme=True) >= 1
    assert api.submit(request).status == TaskStatus.QUEUED
    assert len(store.list_tasks(status=[TaskStatus.QUEUED])) == 3
    assert api.scheduler.reservations.user_usage(settings.user)["tasks"] == 3


def test_the_clis_follow_gets_every_line_across_a_redis_restart(settings: Settings, store: SQLiteStore,
                                                                own_redis: PersistentRedis) -> None:
    settings = settings.replace(redis_url=own_redis.url)
    task = queued_task(store, settings.worker_id, "true")
    writer_bus = LogBus.from_url(own_redis.url)
    writer_bus.attempt(task.task_id, "a1", 3600)
    writer = writer_bus.writer(task.task_id, execution="a1")
    writer.add_many([(f"line {i}", "") for i in range(1, 51)])
    writer.flush()
    api = CloudAI(settings, connect=resp.connect)
    follower, events = run_in_thread(lambda: [e for batch in api.follow_batches(task.task_id, reconnect_for_s=30)
                                              for e in batch])
    wait_for(lambda: api.redis.exists(f"cloudai:logs:{task.task_id}"), 5, what="the stream")
    time.sleep(0.5)
    own_redis.stop()
    time.sleep(1.5)
    own_redis.start()
    writer = LogBus.from_url(own_redis.url).writer(task.task_id, execution="a1")
    writer.add_many([(f"line {i}", "") for i in range(51, 101)])
    writer.flush()
    LogBus.from_url(own_redis.url).end(task.task_id, "completed", 0, execution="a1")
    follower.join(60)
    got = events[0] if events else []
    lines = [e for e in got if isinstance(e, LogLine)]
    assert [ln.text for ln in lines] == [f"line {i}" for i in range(1, 101)]
    assert isinstance(got[-1], LogEnd) and got[-1].exit_code == 0


# -- faults the review found -------------------------------------------------------------------------------

def _silent_server(close: bool) -> tuple[socket.socket, int]:
    """A TCP server that accepts and then says nothing (or closes at once)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            if close:
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


@pytest.mark.parametrize(("close", "error"), [(False, redis.TimeoutError), (True, redis.ConnectionError)])
def test_a_login_that_times_out_or_is_cut_is_redis_pys_error_and_leaves_no_half_open_connection(
        close: bool, error: type[Exception]) -> None:
    server, port = _silent_server(close)
    try:
        c = lean(f"redis://:pw@127.0.0.1:{port}/2", socket_timeout=0.3, socket_connect_timeout=2)
        for _ in range(2):
            with pytest.raises(error):
                c.get("k")
            assert c._sock is None
    finally:
        server.close()


def test_a_reply_it_cannot_decode_closes_the_connection_so_the_next_command_gets_its_own(redis_url: str) -> None:
    raw = redis.Redis.from_url(redis_url)
    raw.set("bad", b"\xff\xfe not utf-8")
    raw.set("other", "OTHER")
    c = lean(redis_url)
    with pytest.raises(UnicodeDecodeError):  # as redis-py with decode_responses raises
        c.mget(["bad", "other"])
    assert c.get("other") == "OTHER"
    assert c.mget([]) == [] == py(redis_url).mget([])


def test_error_replies_map_to_redis_pys_classes() -> None:
    for message, cls in [("ERR max number of clients reached", redis.ConnectionError),
                         ("ERR invalid password", redis.AuthenticationError),
                         ("NOSCRIPT No matching script", redis.exceptions.NoScriptError),
                         ("WRONGTYPE Operation against a key", redis.ResponseError),
                         ("LOADING Redis is loading", redis.BusyLoadingError)]:
        assert type(resp.ReplyError(message).exception()) is cls, message


def test_the_default_pipeline_is_a_transaction_as_redis_pys(redis_url: str) -> None:
    c = lean(redis_url)
    pipe = c.pipeline()
    assert not isinstance(pipe, resp.Pipeline)
    pipe.set("a", "1")
    pipe.incr("a")
    assert pipe.execute() == [True, 2]


def test_the_first_read_of_redis_py_from_many_threads_at_once_sees_the_whole_module() -> None:
    code = ("import threading\nfrom cloudai.redispy import redis\nerrors = []\n"
            "def read():\n    try:\n        redis.RedisError, redis.exceptions.NoScriptError\n"
            "    except Exception as exc:\n        errors.append(repr(exc))\n"
            "threads = [threading.Thread(target=read) for _ in range(16)]\n"
            "[t.start() for t in threads]\n[t.join() for t in threads]\nprint(errors)")
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
        assert out.stdout.strip() == "[]", out.stdout + out.stderr
