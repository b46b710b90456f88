"""redis-py, imported when first used.

Importing redis-py costs a ``cloudai`` command ~0.12 s of CPU (redis 8 loads its asyncio client, cluster,
sentinel and telemetry modules with the package), more than the rest of a trivial ``submit -f`` together. The
CLI talks to Redis with :mod:`cloudai.resp` instead, so the modules it shares with the services name redis-py
through this module: ``from cloudai.redispy import redis`` binds a stand-in whose first attribute read imports
redis-py (an ordinary import, under the interpreter's import lock: safe from any thread) and hands on the
attribute. An ``except redis.RedisError`` clause reads it only when an exception passes, and annotations are
strings, so a command that never meets redis-py never loads it; a service loads it with its first client.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any


class LazyModule(ModuleType):
    """Stands for the module ``name`` and imports it on the first attribute read. Not put in ``sys.modules``:
    the real module goes there, by the real import. (The standard library's ``LazyLoader`` is not safe when two
    threads make the first read at once before Python 3.12.)"""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:  # only for what the stand-in itself lacks: the module's names
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self.__name__)
        return getattr(module, attr)


if TYPE_CHECKING:
    import redis
else:
    redis = LazyModule("redis")

__all__ = ["LazyModule", "redis"]
