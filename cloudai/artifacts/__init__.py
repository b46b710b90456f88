"""The artifact store (files kept for tasks: their outputs, their uploads), chosen by the settings: a directory
(``CLOUDAI_ARTIFACT_DIR``, or beside a SQLite store's file) or GridFS in the MongoDB store. The master and every
worker open the same one: a directory must be the same path on the same host (one-host clusters), GridFS is
reached as the store is."""

from __future__ import annotations

import os

from cloudai.artifacts.base import (
    INPUT_EXECUTION,
    UPLOAD_NAME,
    Artifact,
    ArtifactKey,
    ArtifactStore,
    TooLarge,
    output_path,
)
from cloudai.errors import ConfigError
from cloudai.settings import Settings

__all__ = ["INPUT_EXECUTION", "UPLOAD_NAME", "Artifact", "ArtifactKey", "ArtifactStore", "TooLarge",
           "artifact_location", "open_artifacts", "output_path"]


def artifact_location(settings: Settings) -> str:
    """Where the settings put the artifact store: ``gridfs`` or a directory."""
    if settings.artifact_dir:
        return os.path.abspath(os.path.expanduser(settings.artifact_dir))
    url = settings.store_url
    if url.startswith(("mongodb://", "mongodb+srv://")):
        return "gridfs"
    if url.startswith("sqlite://"):
        from cloudai.store.sqlite import SQLiteStore

        path = SQLiteStore.path_of(url)
        if path != ":memory:":
            return os.path.join(os.path.dirname(os.path.abspath(path)), "artifacts")
    return os.path.join(os.path.expanduser("~"), ".cache", "cloudai", "artifacts")


def open_artifacts(settings: Settings) -> ArtifactStore:
    """The artifact store of ``settings``; raises :class:`~cloudai.errors.StoreUnavailable` when it can't be
    reached or made."""
    where = artifact_location(settings)
    if where == "gridfs":
        from cloudai.artifacts.mongo import GridFSArtifacts

        return GridFSArtifacts.connect(settings.store_url)
    if not os.path.isabs(where):
        raise ConfigError(f"CLOUDAI_ARTIFACT_DIR={settings.artifact_dir!r}: use an absolute directory path")
    from cloudai.artifacts.directory import DirectoryArtifacts

    return DirectoryArtifacts(where)
