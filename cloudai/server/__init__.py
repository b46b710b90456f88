"""The master: an HTTP API (FastAPI) in front of :class:`cloudai.api.CloudAI` that authenticates every request
with an API token and enforces ownership. ``cloudai server`` runs it with uvicorn; :func:`create_app` builds it
(nothing is built at import time)."""

from cloudai.server.app import create_app

__all__ = ["create_app"]
