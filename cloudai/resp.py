"""A small Redis client for the CLI: one connection, RESP2, the commands a ``cloudai`` command sends.

Why: redis-py's import costs every command ~0.12 s of CPU (:mod:`cloudai.redispy`), and a trivial ``submit -f``
spends ~0.08 s on everything else. :class:`RespClient` answers each command it implements exactly as
``redis.Redis(decode_responses=True)`` does (same Python values, same exception classes: redis-py is imported
when an error is raised, which is rare and then not urgent), and hands every other method to a redis-py client
made on first use, so a caller can't tell them apart. ``tests/integration/test_resp.py`` runs each command on
both clients against a real Redis and compares.

Services keep redis-py: they are long-lived (the import is paid once), threaded and pooled.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

from cloudai.redispy import redis

Arg = str | bytes | int | float
Convert = Callable[[Any], Any]


class ReplyError:
    """An error reply, kept as a value so that a pipeline reads every reply before it raises."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message

    def exception(self) -> Exception:
        """The exception redis-py raises for this reply: its own parser's choice (by the error's first word and,
        for ``ERR``, the message), or the same table for a redis-py without that module."""
        try:
            from redis._parsers.base import BaseParser
        except ImportError:
            pass
        else:
            return BaseParser.parse_error(self.message)  # type: ignore[no-any-return]
        code, _, rest = self.message.partition(" ")
        exc = redis.exceptions
        classes: dict[str, type[Exception]] = {
            "NOSCRIPT": exc.NoScriptError, "LOADING": exc.BusyLoadingError, "READONLY": exc.ReadOnlyError,
            "NOAUTH": exc.AuthenticationError, "WRONGPASS": exc.AuthenticationError,
            "OOM": exc.OutOfMemoryError, "NOPERM": exc.NoPermissionError, "EXECABORT": exc.ExecAbortError,
        }
        if code == "ERR":
            return exc.ResponseError(rest)
        return classes.get(code, exc.ResponseError)(self.message if code not in classes else rest)


def _pairs(reply: Any) -> dict[str, Any]:
    it = iter(reply or ())
    return dict(zip(it, it, strict=True))


def _entries(reply: Any) -> list[tuple[str, dict[str, Any] | None]]:
    return [(entry_id, None if fields is None else _pairs(fields)) for entry_id, fields in reply or ()]


def _streams(reply: Any) -> list[list[Any]]:
    return [[key, _entries(entries)] for key, entries in reply or ()]


def _ok(reply: Any) -> bool | None:
    return True if reply == "OK" else None


def _time(reply: Any) -> tuple[int, int]:
    return int(reply[0]), int(reply[1])


def _same(reply: Any) -> Any:
    return reply


class Commands:
    """The commands both the client and its pipeline send, each returning what redis-py's would."""

    def execute_command(self, *args: Arg, convert: Convert = _same) -> Any:
        raise NotImplementedError

    def ping(self) -> Any:
        return self.execute_command("PING", convert=lambda r: r == "PONG")

    def time(self) -> Any:
        return self.execute_command("TIME", convert=_time)

    def get(self, name: str) -> Any:
        return self.execute_command("GET", name)

    def mget(self, keys: str | Iterable[str], *args: str) -> Any:
        names = [keys] if isinstance(keys, str) else list(keys)
        if not names and not args:
            return []  # as redis-py answers, without asking
        return self.execute_command("MGET", *names, *args)

    def set(self, name: str, value: Arg, ex: int | None = None, px: int | None = None, nx: bool = False,
            xx: bool = False) -> Any:
        args: list[Arg] = ["SET", name, value]
        if ex is not None:
            args += ["EX", int(ex)]
        if px is not None:
            args += ["PX", int(px)]
        args += ["NX"] if nx else ["XX"] if xx else []
        return self.execute_command(*args, convert=_ok)

    def delete(self, *names: str) -> Any:
        return self.execute_command("DEL", *names)

    def exists(self, *names: str) -> Any:
        return self.execute_command("EXISTS", *names)

    def expire(self, name: str, time: int) -> Any:
        return self.execute_command("EXPIRE", name, int(time), convert=bool)

    def incr(self, name: str, amount: int = 1) -> Any:
        return self.execute_command("INCRBY", name, amount)

    def hget(self, name: str, key: str) -> Any:
        return self.execute_command("HGET", name, key)

    def hgetall(self, name: str) -> Any:
        return self.execute_command("HGETALL", name, convert=_pairs)

    def hkeys(self, name: str) -> Any:
        return self.execute_command("HKEYS", name)

    def hdel(self, name: str, *keys: str) -> Any:
        return self.execute_command("HDEL", name, *keys)

    def smembers(self, name: str) -> Any:
        return self.execute_command("SMEMBERS", name, convert=set)

    def sadd(self, name: str, *values: Arg) -> Any:
        return self.execute_command("SADD", name, *values)

    def lpush(self, name: str, *values: Arg) -> Any:
        return self.execute_command("LPUSH", name, *values)

    def publish(self, channel: str, message: Arg) -> Any:
        return self.execute_command("PUBLISH", channel, message)

    def xread(self, streams: dict[str, str], count: int | None = None, block: int | None = None) -> Any:
        args: list[Arg] = ["XREAD"]
        if count is not None:
            args += ["COUNT", count]
        if block is not None:
            args += ["BLOCK", block]
        return self.execute_command(*args, "STREAMS", *streams.keys(), *streams.values(), convert=_streams)

    def xrange(self, name: str, min: str = "-", max: str = "+", count: int | None = None) -> Any:
        tail: list[Arg] = [] if count is None else ["COUNT", count]
        return self.execute_command("XRANGE", name, min, max, *tail, convert=_entries)

    def xrevrange(self, name: str, max: str = "+", min: str = "-", count: int | None = None) -> Any:
        tail: list[Arg] = [] if count is None else ["COUNT", count]
        return self.execute_command("XREVRANGE", name, max, min, *tail, convert=_entries)

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Arg) -> Any:
        return self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)

    def eval(self, script: str, numkeys: int, *keys_and_args: Arg) -> Any:
        return self.execute_command("EVAL", script, numkeys, *keys_and_args)


class Script:
    """A Lua script, sent whole with ``EVAL`` each time it runs: Redis keeps it compiled by its SHA1, so there is
    nothing to load first or to load again when Redis lost it. (redis-py's ``Script`` runs ``EVALSHA``: for a
    long-lived client that saves sending the text; a CLI process runs each script once or twice, and hashing it
    would load OpenSSL's hashlib, ~3 ms of every command.)"""

    def __init__(self, client: RespClient, script: str) -> None:
        self.client = client
        self.script = script

    def __call__(self, keys: Sequence[Arg] = (), args: Sequence[Arg] = (), client: Any = None) -> Any:
        target = client if client is not None else self.client
        return target.eval(self.script, len(keys), *keys, *args)


class RespClient(Commands):
    """One Redis connection, opened on the first command and again after an error; thread-safe (a lock per
    round trip). Methods it does not implement are redis-py's, on a client of the same URL made on first use."""

    def __init__(self, url: str, *, host: str = "localhost", port: int = 6379, path: str | None = None,
                 db: int = 0, username: str | None = None, password: str | None = None,
                 socket_timeout: float | None = 30.0, socket_connect_timeout: float | None = 5.0) -> None:
        self.url = url
        self.host, self.port, self.path, self.db = host, port, path, db
        self.username, self.password = username, password
        self.socket_timeout, self.socket_connect_timeout = socket_timeout, socket_connect_timeout
        self._sock: socket.socket | None = None
        self._reader: Any = None
        self._lock = threading.Lock()

    # -- the wire -----------------------------------------------------------------------------------------
    def _where(self) -> str:
        return f"unix socket: {self.path}" if self.path else f"{self.host}:{self.port}"

    def _connect(self) -> None:
        """Open the connection and log in (AUTH, SELECT); any failure closes it and raises redis-py's error."""
        try:
            if self.path:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.socket_connect_timeout)
                sock.connect(self.path)
            else:
                # an ASCII host as bytes: getaddrinfo would otherwise import the idna codec (~3 ms a command)
                host = self.host.encode() if self.host.isascii() else self.host
                sock = socket.create_connection((host, self.port), self.socket_connect_timeout)  # type: ignore[arg-type]
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except TimeoutError as exc:
            raise redis.TimeoutError(f"Timeout connecting to server {self._where()}") from exc
        except OSError as exc:
            raise redis.ConnectionError(f"Error {exc.errno} connecting to {self._where()}. {exc.strerror}.") from exc
        sock.settimeout(self.socket_timeout)
        self._sock, self._reader = sock, sock.makefile("rb", buffering=1 << 16)
        hello: list[list[Arg]] = []
        if self.password:
            hello.append(["AUTH", self.username, self.password] if self.username else ["AUTH", self.password])
        if self.db:
            hello.append(["SELECT", self.db])
        if not hello:
            return
        try:
            replies = self._round_trip(hello)
        except BaseException as exc:
            self.close()
            raise self._wire_error(exc) from exc
        for reply in replies:
            if isinstance(reply, ReplyError):
                self.close()
                raise reply.exception()

    def _wire_error(self, exc: BaseException) -> BaseException:
        """redis-py's exception for a failure on the wire (anything else is raised as it is)."""
        if isinstance(exc, TimeoutError):
            return redis.TimeoutError("Timeout reading from socket")
        if isinstance(exc, OSError):
            return redis.ConnectionError(f"Error while reading from {self._where()}: {exc}")
        return exc

    def close(self) -> None:
        """Close the connection (the next command opens another); also what any error in a round trip does, so
        that no half-read reply is taken for the next command's."""
        sock, self._sock, self._reader = self._sock, None, None
        if sock is not None:
            sock.close()

    @staticmethod
    def _pack(commands: list[list[Arg]]) -> bytes:
        out: list[bytes] = []
        for command in commands:
            out.append(b"*%d\r\n" % len(command))
            for arg in command:
                if isinstance(arg, bytes):
                    data = arg
                elif isinstance(arg, str):
                    data = arg.encode()
                elif isinstance(arg, bool) or not isinstance(arg, int | float):
                    raise redis.DataError(f"Invalid input of type: {type(arg).__name__!r}. Convert to a bytes, "
                                          "string, int or float first.")
                else:
                    data = (repr(arg) if isinstance(arg, float) else str(arg)).encode()
                out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        return b"".join(out)

    def _read(self) -> Any:
        line = self._reader.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionResetError(0, "Connection closed by server")
        kind, rest = line[:1], line[1:-2]
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            data = self._reader.read(size + 2)
            if len(data) != size + 2:
                raise ConnectionResetError(0, "Connection closed by server")
            return data[:-2].decode()
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [self._read() for _ in range(size)]
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return ReplyError(rest.decode())
        raise redis.exceptions.InvalidResponse(f"Protocol Error: {line!r}")

    def _round_trip(self, commands: list[list[Arg]]) -> list[Any]:
        assert self._sock is not None
        self._sock.sendall(self._pack(commands))
        return [self._read() for _ in commands]

    def send(self, commands: list[list[Arg]]) -> list[Any]:
        """Send ``commands`` in one write and read their replies (error replies as :class:`ReplyError`). A
        connection that has been open before is tried again once on a connection error (Redis restarted
        meanwhile), as redis-py retries."""
        with self._lock:
            for attempt in range(2):
                fresh = self._sock is None
                if fresh:
                    self._connect()
                try:
                    return self._round_trip(commands)
                except BaseException as exc:  # a timeout, a reset, a bad byte, an interrupt: never read on after it
                    self.close()
                    stale = isinstance(exc, OSError) and not isinstance(exc, TimeoutError) and not fresh
                    if not stale or attempt:
                        raise self._wire_error(exc) from exc
            raise AssertionError("unreachable")

    # -- commands ---------------------------------------------------------------------------------------
    def execute_command(self, *args: Arg, convert: Convert = _same) -> Any:
        reply = self.send([list(args)])[0]
        if isinstance(reply, ReplyError):
            raise reply.exception()
        return convert(reply)

    def register_script(self, script: str) -> Script:
        return Script(self, script)

    def pipeline(self, transaction: bool = True) -> Any:
        """Commands sent in one write (``transaction=False``, what the CLI uses); a MULTI/EXEC transaction is
        redis-py's, as redis-py's default is."""
        if transaction:
            return self._redis_py.pipeline(transaction=True)
        return Pipeline(self)

    @cached_property
    def _redis_py(self) -> redis.Redis:
        return redis_py(self.url, self.socket_timeout, self.socket_connect_timeout)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._redis_py, name)


class Pipeline(Commands):
    """Commands buffered and sent in one write on :meth:`execute` (not a transaction, as
    ``pipeline(transaction=False)``)."""

    def __init__(self, client: RespClient) -> None:
        self.client = client
        self.commands: list[list[Arg]] = []
        self.converts: list[Convert] = []

    def execute_command(self, *args: Arg, convert: Convert = _same) -> Pipeline:
        self.commands.append(list(args))
        self.converts.append(convert)
        return self

    def execute(self) -> list[Any]:
        try:
            replies = self.client.send(self.commands) if self.commands else []
        finally:
            self.commands, converts, self.converts = [], self.converts, []
        for reply in replies:
            if isinstance(reply, ReplyError):
                raise reply.exception()
        return [convert(reply) for convert, reply in zip(converts, replies, strict=True)]


def redis_py(url: str, socket_timeout: float | None = 30.0, socket_connect_timeout: float | None = 5.0) -> redis.Redis:
    """redis-py's client for ``url`` as the log bus uses it (text replies, timeouts, a health check when idle)."""
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=socket_timeout,
                                socket_connect_timeout=socket_connect_timeout, health_check_interval=15)


def connect(url: str, socket_timeout: float | None = 30.0, socket_connect_timeout: float | None = 5.0) -> redis.Redis:
    """A :class:`RespClient` for a ``redis://`` or ``unix://`` URL (password, user and db included); redis-py's
    client, with ``decode_responses``, for anything else (TLS, other query options)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    db = query.pop("db", [None])[0] or (parts.path.lstrip("/") if parts.scheme == "redis" else "") or "0"
    unusual = (  # what redis-py reads its own way: let it
        not url.startswith(("redis://", "unix://")) or query or not (db.isascii() and db.isdigit())
        or (parts.username and not parts.password)  # a user without a password
        or "%" in (parts.hostname or "") or (parts.scheme == "unix" and ("%" in parts.path or not parts.path))
    )
    if unusual:
        return redis_py(url, socket_timeout, socket_connect_timeout)
    client = RespClient(
        url, host=parts.hostname or "localhost", port=parts.port or 6379,
        path=parts.path if parts.scheme == "unix" else None, db=int(db),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,  # an empty one is none, as for redis-py
        socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout,
    )
    # duck-typed: every redis.Redis method it does not implement is redis-py's (RespClient.__getattr__)
    return cast("redis.Redis", client)


def redis_db(client: Any) -> int:
    """The database number ``client`` uses (a RespClient or a redis-py client)."""
    if isinstance(client, RespClient):
        return client.db
    return int(client.connection_pool.connection_kwargs.get("db", 0) or 0)
