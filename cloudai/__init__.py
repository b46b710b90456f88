"""CloudAI: run resource-limited containers on a pool of GPU and CPU hosts.

``celery -A cloudai worker`` finds the Celery app through :func:`__getattr__`, so importing
``cloudai`` itself never imports Celery (only :mod:`cloudai.celery_app` does).
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from cloudai.celery_app import app

        return app
    raise AttributeError(f"module 'cloudai' has no attribute {name!r}")
