"""redis-py, imported when first used.

Importing redis-py costs a ``cloudai`` command ~0.12 s of CPU (redis 8 loads its asyncio client, cluster,
sentinel and telemetry modules with the package), more than the rest of a trivial ``submit -f`` together. The
CLI talks to Redis with :mod:`cloudai.resp` instead, so the modules it shares with the services name redis-py
through this module: ``from cloudai.redispy import redis`` binds a module object that loads redis-py on the first
attribute read. An ``except redis.RedisError`` clause reads it only when an exception passes, and annotations are
strings, so a command that never meets redis-py never loads it; a service loads it on its first client.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import TYPE_CHECKING


def lazy_module(name: str) -> ModuleType:
    """``name`` as a module that executes on its first attribute read (the standard library's recipe with
    :class:`importlib.util.LazyLoader`); the module itself when it is already imported."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module


if TYPE_CHECKING:
    import redis
else:
    redis = lazy_module("redis")

__all__ = ["lazy_module", "redis"]
