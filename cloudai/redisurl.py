"""``CLOUDAI_REDIS_URL``: the one address of the Redis deployment, in the forms every client understands.

- ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...``, ``unix://...``: one Redis (redis-py's own
  URL forms, handed on as they are).
- ``sentinel://[[user]:password@]host:port[,host:port...]/service[/db]``: a Redis Sentinel deployment (one
  primary, its replicas, three or more sentinels). The hosts are the *sentinels*; ``service`` is the name they
  monitor (``sentinel monitor <service> ...``); the password, if any, is the data nodes' (``requirepass``), the
  sentinels themselves are reached without one. Every client asks the sentinels which node is the primary and asks
  again after a failover.

No Redis or Celery import here: :mod:`cloudai.redisconn` makes redis-py clients (sync and asyncio) and
:mod:`cloudai.celery_app` hands :func:`celery_broker` to Celery, so the master, workers, beat and the operator's
commands read the one variable the same way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from cloudai.errors import ConfigError, redact

SENTINEL_SCHEME = "sentinel://"
FORM = "sentinel://[:password@]host:26379,host:26380,host:26381/mymaster[/db]"
# sentinels answer in milliseconds or not at all (a dead host, a partition): ask the next one soon
SENTINEL_SOCKET_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class SentinelTarget:
    """A Sentinel deployment as ``CLOUDAI_REDIS_URL`` names it."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    userinfo: str = ""  # as written in the URL (still percent-encoded), for the URLs made from this one

    def kombu_url(self) -> str:
        """kombu's and Celery's form: one ``sentinel://`` URL per sentinel, joined by ``;`` (the master's name
        goes in the transport options, see :func:`celery_broker`)."""
        auth = f"{self.userinfo}@" if self.userinfo else ""
        return ";".join(f"sentinel://{auth}{_netloc(host, port)}/{self.db}" for host, port in self.sentinels)


def is_sentinel(url: str) -> bool:
    return url.lower().startswith(SENTINEL_SCHEME)


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bad(url: str, what: str) -> ConfigError:
    return ConfigError(f"CLOUDAI_REDIS_URL={redact(url)!r}: {what}; a Sentinel deployment is written {FORM}")


def _host_port(url: str, item: str) -> tuple[str, int]:
    if item.startswith("["):  # [v6 address]:port
        host, _, rest = item[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = item.rpartition(":")
    if not host or not port_text:
        raise _bad(url, f"the sentinel {item!r} needs host:port")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad(url, f"the sentinel {item!r} has no valid port")
    return host, int(port_text)


def parse_sentinel(url: str) -> SentinelTarget | None:
    """The Sentinel deployment ``url`` names, or None when it names one Redis. A malformed sentinel URL is a
    :class:`ConfigError` saying what is wrong and how it is written."""
    if not is_sentinel(url):
        return None
    rest = url[len(SENTINEL_SCHEME):]
    if "?" in rest or "#" in rest:
        raise _bad(url, "options (?...) are not understood")
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user_text, has_password, password_text = userinfo.partition(":")
        username = unquote(user_text) or None
        password = unquote(password_text) if has_password else None
    if not hosts:
        raise _bad(url, "no sentinel is named")
    sentinels = tuple(_host_port(url, item) for item in hosts.split(","))
    parts = path.strip("/").split("/") if path.strip("/") else []
    if not parts:
        raise _bad(url, "the master's name (the service the sentinels monitor) is missing")
    if len(parts) > 2:
        raise _bad(url, f"unexpected path {path!r}")
    db_text = parts[1] if len(parts) == 2 else "0"
    if not db_text.isdigit():
        raise _bad(url, f"the database {db_text!r} is not a number")
    return SentinelTarget(sentinels, unquote(parts[0]), int(db_text), username, password, userinfo)


def check(url: str) -> str:
    """``url`` if it names something CloudAI can connect to (the scheme is known, a sentinel URL is whole)."""
    lowered = url.lower()
    if not lowered.startswith(("redis://", "rediss://", "unix://", SENTINEL_SCHEME)):
        raise ConfigError(f"CLOUDAI_REDIS_URL={redact(url)!r}: use redis://host:6379/0, rediss://... (TLS), "
                          f"unix:///path/redis.sock or {FORM}")
    parse_sentinel(url)
    return url


def celery_broker(url: str) -> tuple[str, dict[str, Any]]:
    """Celery's broker (and Redis result backend) URL for ``url`` and the transport options it needs: for a
    Sentinel deployment kombu's ``sentinel://...;sentinel://...`` with ``master_name`` (kombu's Redis transport,
    ``SentinelChannel``), else the URL itself and no options."""
    target = parse_sentinel(check(url))
    if target is None:
        return url, {}
    options: dict[str, Any] = {
        "master_name": target.service,
        "sentinel_kwargs": {"socket_timeout": SENTINEL_SOCKET_TIMEOUT_S,
                            "socket_connect_timeout": SENTINEL_SOCKET_TIMEOUT_S},
    }
    return target.kombu_url(), options
