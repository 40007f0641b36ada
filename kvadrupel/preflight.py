"""Check the configuration before a process starts: one clear line per problem.

Runs before any worker or the API starts (``kvadrupel api|ingest|evaluate|deliver|
scheduler``), so a bad DSN, an unreachable broker or a missing token is reported as
``kvadrupel: configuration error: ...`` with exit status 2, not as a traceback.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from base.errors import ConfigError
from kvadrupel.settings import Settings

__all__ = ["check_settings", "check_reachable"]


def _url_problem(name: str, url: str) -> str | None:
    try:
        u = make_url(url)
    except ArgumentError:
        return f"{name}: not a database URL: {url!r}"
    if u.get_backend_name() not in ("postgresql", "sqlite"):
        return (f"{name}: unsupported database {u.get_backend_name()!r} "
                "(use postgresql+psycopg:// or sqlite:///)")
    return None


def check_settings(settings: Settings, role: str) -> None:
    problems = []
    for i, url in enumerate(settings.shards):
        if p := _url_problem(f"KVADRUPEL_SHARDS[{i}]", url):
            problems.append(p)
    for i, url in enumerate(settings.shard_replicas):
        if p := _url_problem(f"KVADRUPEL_SHARD_REPLICAS[{i}]", url):
            problems.append(p)
    if settings.shard_replicas and len(settings.shard_replicas) != len(settings.shards):
        problems.append("KVADRUPEL_SHARD_REPLICAS must list one replica per shard, in shard order")
    if settings.control_db and (p := _url_problem("KVADRUPEL_CONTROL_DB", settings.control_db)):
        problems.append(p)
    if settings.shards and not settings.control_db:
        problems.append("KVADRUPEL_CONTROL_DB is required when KVADRUPEL_SHARDS is set")
    if settings.embedded_bus and role in ("ingest", "evaluate", "deliver", "scheduler"):
        problems.append(
            f"`kvadrupel {role}` is a separate process and needs KVADRUPEL_KAFKA_BOOTSTRAP "
            "(the in-process bus only lives inside `kvadrupel embedded` or `kvadrupel demo`)"
        )
    if role == "api":
        for t in ("admin", "ingest", "portal"):
            token = getattr(settings, f"{t}_token")
            if not token:
                problems.append(f"KVADRUPEL_{t.upper()}_TOKEN is not set")
            elif len(token) < 16:
                problems.append(
                    f"KVADRUPEL_{t.upper()}_TOKEN is too short (at least 16 characters)"
                )
    if problems:
        raise ConfigError("\n  ".join(["", *problems]))


def check_reachable(container: Any) -> None:
    from kvadrupel.ops import readiness

    ok, checks = readiness(container, timeout=5.0)
    if not ok:
        raise ConfigError(
            "\n  ".join(["cannot reach:", *(f"{k}: {v}" for k, v in checks.items() if v != "ok")])
        )
