"""Task store backends, chosen by URL: ``mongodb://`` (production) or ``sqlite:///path``."""

from __future__ import annotations

from cloudai.errors import ConfigError
from cloudai.store.base import TaskStore

__all__ = ["TaskStore", "open_store"]


def open_store(url: str) -> TaskStore:
    """Open the store named by ``url``; raises :class:`ConfigError` for an unknown scheme and
    :class:`~cloudai.errors.StoreUnavailable` when it can't be reached."""
    if url.startswith(("mongodb://", "mongodb+srv://")):
        from cloudai.store.mongo import MongoStore

        return MongoStore.connect(url)
    if url.startswith("sqlite://"):
        from cloudai.store.sqlite import SQLiteStore

        return SQLiteStore.from_url(url)
    raise ConfigError(
        f"CLOUDAI_STORE_URL={url!r}: use mongodb://host:27017/db (production) or sqlite:///path/to/file.db"
    )
