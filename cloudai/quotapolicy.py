"""Which quota a user's tasks are held to: the operator's defaults (``CLOUDAI_DEFAULT_QUOTA_*``), each limit of
which an admin-set quota (``cloudai admin quota set``) replaces for that user. Light: models and settings only.

Every placing process (master, beat, worker agents) must hold users to the same defaults, so the master's are
the cluster's: it publishes them in Redis when it starts (:func:`to_text`), and the others' passes read them
there (:func:`from_text`), falling back to their own settings while none are published."""

from __future__ import annotations

import json
from collections.abc import Mapping

from cloudai.models import QUOTA_LIMITS, Quota
from cloudai.settings import Settings

Defaults = Mapping[str, float | None]


def defaults(settings: Settings) -> dict[str, float | None]:
    """The operator's default limit of each quota resource (``None``: no limit)."""
    return {
        "cpus": settings.default_quota_cpus,
        "memory": settings.default_quota_memory,
        "gpus": settings.default_quota_gpus,
        "tasks": settings.default_quota_tasks,
        "waiting": settings.default_quota_waiting,
    }


def to_text(values: Defaults) -> str:
    return json.dumps({name: values.get(name) for name in QUOTA_LIMITS}, sort_keys=True)


def from_text(text: str | bytes | None) -> dict[str, float | None] | None:
    """Published defaults (None when there are none, or they are not readable)."""
    if not text:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    return {name: (v if isinstance(v, int | float) and not isinstance(v, bool) else None)
            for name, v in ((n, doc.get(n)) for n in QUOTA_LIMITS)}


def effective(user_id: str, admin: Quota | None, base: Settings | Defaults) -> Quota | None:
    """``user_id``'s quota: each limit the admin set, else the default (``base``: settings, or defaults as
    published); None when neither limits anything (placement then skips the quota check)."""
    merged = dict(defaults(base) if isinstance(base, Settings) else base)
    if admin is not None:
        merged.update({name: value for name, value in admin.limits().items() if value is not None})
    if all(value is None for value in merged.values()):
        return None
    limits = {name: merged[name] for name in QUOTA_LIMITS}
    return Quota(
        user_id,
        cpus=limits["cpus"],
        memory=None if limits["memory"] is None else int(limits["memory"]),
        gpus=None if limits["gpus"] is None else int(limits["gpus"]),
        tasks=None if limits["tasks"] is None else int(limits["tasks"]),
        waiting=None if limits["waiting"] is None else int(limits["waiting"]),
        **({"updated_at": admin.updated_at} if admin is not None else {}),
    )


def running_limits(quota: Quota | None) -> Quota | None:
    """What placement checks of ``quota``: None when it limits only waiting tasks (the placement script and a
    pass's shortcut for users without a quota then apply)."""
    if quota is None or all(getattr(quota, name) is None for name in ("cpus", "memory", "gpus", "tasks")):
        return None
    return quota
