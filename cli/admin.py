"""``cloudai admin ...``: operator commands in direct mode (they need the store URL, never the API)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from cloudai.cli.main import Context


@click.group()
def admin() -> None:
    """Operator commands (direct mode: they use CLOUDAI_STORE_URL)."""


@admin.group()
def token() -> None:
    """API tokens for `cloudai server`: create, list, revoke."""


@token.command("create")
@click.argument("user")
@click.option("--admin", "is_admin", is_flag=True, help="An admin token: sees and acts on every task and worker.")
@click.option("--expires", metavar="DURATION", help="Expire after this long, such as 90d or 12h.  [default: never]")
@click.pass_obj
def token_create(ctx: Context, user: str, is_admin: bool, expires: str | None) -> None:
    """Create a token for USER; it is printed once, on the last line (only its SHA-256 is kept)."""
    from cloudai import tokens
    from cloudai.store import open_store

    secret, record = tokens.create(open_store(ctx.settings.store_url), user, is_admin, expires)
    until = f", expires {record.expires_at:%Y-%m-%d %H:%M} UTC" if record.expires_at else ""
    click.echo(f"created {record.role} token {record.prefix}... for {record.user_id}{until}; it is shown only "
               "now. Give it to the user: `cloudai login URL` asks for it.", err=True)
    click.echo(secret)


@token.command("list")
@click.option("--user", help="Only this user's tokens.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def token_list(ctx: Context, user: str | None, as_json: bool) -> None:
    """List tokens: prefix, user, role, created, expires, last use, revoked (never the secrets)."""
    from cloudai.cli import render
    from cloudai.models import utcnow
    from cloudai.store import open_store

    records = open_store(ctx.settings.store_url).list_tokens(user)
    if as_json:
        click.echo(render.to_json([{k: v for k, v in r.to_doc().items() if k != "token_hash"} for r in records]))
        return
    if not records:
        click.echo("no tokens; create one with `cloudai admin token create USER`", err=True)
        return
    from rich.table import Table

    now = utcnow()
    table = Table(box=None, header_style="bold")
    for col in ("PREFIX", "USER", "ROLE", "CREATED", "EXPIRES", "LAST USED", "STATE"):
        table.add_column(col, no_wrap=True)
    for r in records:
        state = "revoked" if r.revoked else ("expired" if r.expired(now) else "active")
        table.add_row(r.prefix, r.user_id, r.role, f"{r.created_at:%Y-%m-%d %H:%M}",
                      f"{r.expires_at:%Y-%m-%d %H:%M}" if r.expires_at else "never", render.age(r.last_used_at),
                      state)
    render.console().print(table)


@token.command("revoke")
@click.argument("prefix")
@click.pass_obj
def token_revoke(ctx: Context, prefix: str) -> None:
    """Revoke the token with PREFIX (as `token list` shows it); it stops working at once."""
    from cloudai import tokens
    from cloudai.store import open_store

    record = tokens.revoke(open_store(ctx.settings.store_url), prefix)
    click.echo(f"revoked {record.prefix}... of {record.user_id}")
