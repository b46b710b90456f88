"""``cloudai admin quota set|list|clear`` (admin-set per-user limits) and ``cloudai quota`` (your usage)."""

from __future__ import annotations

from typing import Any

import click

# the rendering and model modules are imported by the commands that run, not by `cloudai --help`

_ROWS = (("cpus", "CPUs"), ("memory", "memory"), ("gpus", "GPUs"), ("tasks", "tasks"), ("waiting", "waiting tasks"))


def _show(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    from cloudai.models import format_bytes

    return format_bytes(int(value)) if name == "memory" else f"{value:g}"


def _parsed(fn: Any, value: str | None) -> Any:
    """A value parsed as ``submit`` parses it; a bad one is the same ValidationError (``Error: invalid memory
    '512': ...``, exit 2)."""
    return None if value is None else fn(value)


def register(cli: click.Group, context: type, pass_ctx: Any) -> None:
    """Add ``admin quota ...`` (to the ``admin`` group, made here if the CLI has none yet) and ``quota``."""
    found = cli.commands.get("admin")
    if isinstance(found, click.Group):
        admin = found
    else:
        @cli.group("admin")
        def admin_group() -> None:
            """Cluster administration (direct mode): quotas."""

        admin = admin_group

    @admin.group("quota")
    def quota_group() -> None:
        """Per-user limits on what queued and running tasks hold at once."""

    @quota_group.command("set")
    @click.argument("user")
    @click.option("--cpus", help="Most CPU cores the user's tasks hold at once, such as 8 or 0.5.")
    @click.option("--memory", help="Most memory, such as 64g (a bare number is bytes).")
    @click.option("--gpus", type=click.IntRange(min=0), help="Most GPUs.")
    @click.option("--tasks", type=click.IntRange(min=0), help="Most queued and running tasks.")
    @click.option("--waiting", type=click.IntRange(min=0), help="Most waiting (pending) tasks; past it a submit "
                  "is refused.")
    @pass_ctx
    def quota_set(ctx: Any, user: str, cpus: str | None, memory: str | None, gpus: int | None,
                  tasks: int | None, waiting: int | None) -> None:
        """Set USER's quota; limits not given keep the operator's defaults (CLOUDAI_DEFAULT_QUOTA_*), and this
        replaces the whole quota."""
        if cpus is None and memory is None and gpus is None and tasks is None and waiting is None:
            raise click.UsageError("give at least one of --cpus, --memory, --gpus, --tasks, --waiting")
        from cloudai.models import parse_cpus, parse_size

        quota = ctx.direct.set_quota(user, cpus=_parsed(parse_cpus, cpus), memory=_parsed(parse_size, memory),
                                     gpus=gpus, tasks=tasks, waiting=waiting)
        click.echo(f"{user}: " + ", ".join(f"{label} {_show(name, getattr(quota, name))}" for name, label in _ROWS))

    @quota_group.command("list")
    @click.option("--json", "as_json", is_flag=True)
    @pass_ctx
    def quota_list(ctx: Any, as_json: bool) -> None:
        """Every user's quota."""
        from cloudai.cli import render
        from cloudai.models import quota_doc

        quotas = ctx.direct.quotas()
        if as_json:
            click.echo(render.to_json([quota_doc(q.user_id, q) for q in quotas]))
            return
        if not quotas:
            click.echo("no quotas set; every user has the operator's defaults (CLOUDAI_DEFAULT_QUOTA_*)", err=True)
            return
        from rich.table import Table

        table = Table(box=None, header_style="bold")
        for col in ("USER", "CPUS", "MEMORY", "GPUS", "TASKS", "WAITING"):
            table.add_column(col, no_wrap=True)
        for q in quotas:
            table.add_row(q.user_id, *(_show(name, getattr(q, name)) for name, _ in _ROWS))
        render.console().print(table)

    @quota_group.command("clear")
    @click.argument("user")
    @pass_ctx
    def quota_clear(ctx: Any, user: str) -> None:
        """Remove USER's quota (the operator's defaults apply again)."""
        ctx.direct.clear_quota(user)
        click.echo(f"{user}: quota cleared")

    @cli.command("quota")
    @click.option("--user", help="Whose quota (admins; a user sees their own).  [default: you]")
    @click.option("--json", "as_json", is_flag=True)
    @pass_ctx
    def quota_view(ctx: Any, user: str | None, as_json: bool) -> None:
        """What your queued and running tasks hold now, against your quota."""
        from cloudai.cli import render
        from cloudai.models import quota_doc

        quota, usage = ctx.api.quota_usage(user or ctx.default_user())
        who = quota.user_id if quota else user or ctx.default_user()
        if as_json:
            click.echo(render.to_json(quota_doc(who, quota, usage)))
            return
        from rich.table import Table

        table = Table(box=None, header_style="bold", title=f"quota of {who}", title_justify="left")
        for col in ("RESOURCE", "USED", "LIMIT"):
            table.add_column(col, no_wrap=True)
        for name, label in _ROWS:
            table.add_row(label, _show(name, usage.get(name)), _show(name, getattr(quota, name) if quota else None)
                          if quota and getattr(quota, name) is not None else "no limit")
        render.console().print(table)
