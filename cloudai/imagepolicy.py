"""Where task images may come from, and what a user learns when a pull fails.

An image reference names a registry host (Docker's rule: a first component with ``.`` or ``:``, or
``localhost``; else Docker Hub, ``docker.io``). The engine fetches from that host with the worker host's network,
so a reference is also a way to make the worker connect somewhere: only the operator's registries
(``CLOUDAI_ALLOWED_REGISTRIES``, glob patterns) are allowed, and a host that is a loopback, link-local or private
address (or resolves to one) is refused unless an entry names it exactly (no wildcard). Checked at submit by the
master and again by each worker before a pull.

A failed pull is told to the user in a few words (not found, unauthorized, registry unreachable): the engine's
message can hold the registry's response body, addresses of the worker's network (its DNS server) and
internals; the worker's log keeps it for the operator."""

from __future__ import annotations

import fnmatch
import ipaddress
import socket
from collections.abc import Callable, Sequence

from cloudai.errors import ValidationError

DOCKER_HUB = "docker.io"
_HUB_ALIASES = {"index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
Resolve = Callable[[str], list[str]]


def registry_of(image: str) -> str:
    """The registry host (with its port, lower case) that ``image`` is pulled from."""
    first, sep, _rest = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        host = first.lower()
        return DOCKER_HUB if host in _HUB_ALIASES else host
    return DOCKER_HUB


def _hostname(host: str) -> str:
    """``host`` without its port."""
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() else host


def address_kind(address: str) -> str | None:
    """``loopback``, ``link-local`` or ``private`` (any address not routed on the internet) for an IP address;
    None for a public one or for text that is not an address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    return None if ip.is_global else "private"


def resolve(name: str) -> list[str]:
    """The addresses ``name`` resolves to here ([] when it doesn't)."""
    try:
        return sorted({str(info[4][0]) for info in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)})
    except (OSError, UnicodeError):
        return []


def refusal(image: str, allowed: Sequence[str], resolver: Resolve = resolve) -> str | None:
    """Why ``image`` may not be pulled on this cluster, or None when it may. ``allowed``: glob patterns of
    registry hosts (``*`` for any public registry); an empty list allows any registry (still not private
    addresses)."""
    host = registry_of(image)
    patterns = [p.strip().lower() for p in allowed if p.strip()] or ["*"]
    exact = host in patterns
    if not exact and not any(fnmatch.fnmatchcase(host, p) for p in patterns):
        return (f"its registry {host} is not allowed on this cluster; allowed registries "
                f"(CLOUDAI_ALLOWED_REGISTRIES): {', '.join(patterns)}")
    if exact:
        return None  # the operator named this host: its address is their choice
    name = _hostname(host)
    if name == "localhost" or name.endswith(".localhost"):
        kind: str | None = "loopback"
    elif _is_ip(name):
        kind = address_kind(name)
    else:  # a name matched by a wildcard: where it points now (the worker checks again with its own resolver)
        kind = next((k for k in map(address_kind, resolver(name)) if k is not None), None)
    if kind is not None:
        return (f"its registry {host} is a {kind} address, which tasks may not pull from; an operator allows it "
                "by naming it in CLOUDAI_ALLOWED_REGISTRIES")
    return None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def check(image: str, allowed: Sequence[str], resolver: Resolve = resolve) -> None:
    """Raise :class:`ValidationError` (exit 2) when ``image`` may not be pulled here (see :func:`refusal`)."""
    why = refusal(image, allowed, resolver)
    if why is not None:
        raise ValidationError("image", image, why)


# what a failed pull says to the user: the first kind whose words appear in the engine's message
_PULL_KINDS = (
    ("not found (no such repository or tag, or no access to it)",
     ("not found", "manifest unknown", "name unknown", "does not exist", "http 404")),
    ("unauthorized (the registry wants credentials, or the repository is private)",
     ("unauthorized", "denied", "authentication required", "forbidden", "no basic auth credentials", "http 401",
      "http 403")),
    ("the registry's rate limit was reached; try again later", ("toomanyrequests", "too many requests")),
    ("registry unreachable (its name does not resolve, or it does not answer)",
     ("no such host", "dial tcp", "connection refused", "i/o timeout", "timeout", "network is unreachable",
      "tls", "x509", "certificate", "connection reset", "eof", "server gave http response",
      "no route to host", "temporary failure", "lookup ")),
)


def pull_reason(status_code: int | None, message: str) -> str:
    """A pull failure in a few fixed words (nothing of the engine's or the registry's text)."""
    text = message.lower()
    if status_code == 404:
        return _PULL_KINDS[0][0]
    for reason, words in _PULL_KINDS:
        if any(word in text for word in words):
            return reason
    if status_code in (401, 403):
        return _PULL_KINDS[1][0]
    return "the registry refused it"
