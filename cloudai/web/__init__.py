"""The web page the master serves at ``/``: sign-in, my tasks, a task with its live log, workers, submit.

Server-rendered Jinja2 pages (autoescaped) plus one small vanilla script and stylesheet shipped in the package:
no build step and no CDN. The pages read and act through the JSON API (``/v1``) with the session cookie, so the
identity, ownership and CSRF rules are the API's own (:mod:`cloudai.server.auth`, :mod:`cloudai.server.csrf`)."""

from cloudai.web.pages import install

__all__ = ["install"]
