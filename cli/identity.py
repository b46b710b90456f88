"""``cloudai server`` (the master), ``login``, ``logout`` and ``whoami``."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import click

from cloudai.cli.local import LocalCommand

if TYPE_CHECKING:
    from cloudai.cli.main import Context


@click.command(cls=LocalCommand)
@click.option("--host", default="127.0.0.1", show_default=True, envvar="CLOUDAI_SERVER_HOST",
              help="Address to listen on (0.0.0.0: every interface; use TLS then).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535), envvar="CLOUDAI_SERVER_PORT")
@click.option("--ssl-certfile", type=click.Path(exists=True, dir_okay=False), help="TLS certificate (PEM).")
@click.option("--ssl-keyfile", type=click.Path(exists=True, dir_okay=False), help="TLS private key (PEM).")
@click.option("--forwarded-allow-ips", envvar="FORWARDED_ALLOW_IPS",
              help="Proxies whose X-Forwarded-* headers are trusted (behind a reverse proxy).  [default: 127.0.0.1]")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.pass_obj
def server(ctx: Context, host: str, port: int, ssl_certfile: str | None, ssl_keyfile: str | None,
           forwarded_allow_ips: str | None, log_level: str) -> None:
    """Run the master: the HTTP API (OpenAPI at /docs) that users' CLIs talk to with their tokens."""
    if bool(ssl_certfile) != bool(ssl_keyfile):
        raise click.UsageError("TLS needs both --ssl-certfile and --ssl-keyfile")
    import uvicorn

    from cloudai.api import CloudAI
    from cloudai.celery_app import dispatcher, make_app
    from cloudai.server import create_app
    from cloudai.server.slowclient import guarded_h11

    settings = ctx.settings
    cloud = CloudAI(settings, dispatcher(make_app(settings)))
    cloud.store.ping()  # a store or Redis that can't be reached is an error now, not on the first request
    cloud.ping_redis()
    _enough_files(settings.server_max_connections)
    scheme = "https" if ssl_certfile else "http"
    click.echo(f"CloudAI server on {scheme}://{host}:{port} (API docs at /docs)", err=True)
    # slow clients: a request's head and body have deadlines, an idle kept-alive connection closes, and past
    # CLOUDAI_SERVER_MAX_CONNECTIONS connections a request gets 503 (see cloudai/server/slowclient.py)
    uvicorn.run(create_app(settings, cloud), host=host, port=port, ssl_certfile=ssl_certfile,
                ssl_keyfile=ssl_keyfile, log_level=log_level, proxy_headers=True,
                forwarded_allow_ips=forwarded_allow_ips, timeout_graceful_shutdown=5,
                http=guarded_h11(settings.server_header_timeout_s, settings.server_body_timeout_s),
                timeout_keep_alive=settings.server_keepalive_s, limit_concurrency=settings.server_max_connections)


def _enough_files(connections: int) -> None:
    """Raise the soft limit on open files so that ``connections`` clients (plus Redis, the store and the log
    feeds) fit, as far as the hard limit allows; say so when it doesn't."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 1024
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            click.echo(f"warning: at most {new} open files (ulimit -n); CLOUDAI_SERVER_MAX_CONNECTIONS="
                       f"{connections} needs about {wanted}", err=True)


@click.command(cls=LocalCommand)
@click.argument("url", required=False)
@click.option("--token", help="The token (else read from stdin when it is not a terminal, else asked for).")
@click.pass_obj
def login(ctx: Context, url: str | None, token: str | None) -> None:
    """Save the master's URL and your token (in a file only you can read) for the commands that follow."""
    from cloudai.cli.client import api_target, write_credentials
    from cloudai.cli.remote import RemoteCloud

    target = api_target(ctx.settings)
    url = (url or (target[0] if target else "")).rstrip("/")
    if not url:
        raise click.UsageError("give the server's URL, such as `cloudai login https://cloudai.example.com`")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise click.BadParameter("use http(s)://host[:port]", param_hint="URL")
    if token is None:
        token = sys.stdin.readline() if not sys.stdin.isatty() else click.prompt("API token", hide_input=True)
    token = token.strip()
    who = RemoteCloud(url, token).whoami()
    path = write_credentials(url, token)
    role = "admin" if who.get("admin") else "user"
    click.echo(f"logged in to {url} as {who['user']} ({role}); credentials in {path}")
    if parts.scheme == "http" and parts.hostname not in ("localhost", "127.0.0.1", "::1"):
        click.echo("warning: plain http: the token travels unencrypted; serve the API over https", err=True)


@click.command()
def logout() -> None:
    """Forget the saved URL and token (the commands use direct mode again unless CLOUDAI_API_URL is set)."""
    from cloudai.cli.client import credentials_path

    path = credentials_path()
    path.unlink(missing_ok=True)
    click.echo(f"removed {path}")


@click.command()
@click.pass_obj
def whoami(ctx: Context) -> None:
    """Who the commands act as, and through what."""
    from cloudai.cli.remote import RemoteCloud

    api = ctx.api
    if isinstance(api, RemoteCloud):
        who = api.whoami()
        click.echo(f"{who['user']} ({'admin' if who['admin'] else 'user'}, token {who['token']}...) at {api.url}")
    else:
        click.echo(f"{ctx.settings.user} (direct mode: Redis and the store, no token)")
