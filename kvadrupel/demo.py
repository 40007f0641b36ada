"""``kvadrupel demo``: the whole pipeline in one process, embedded, on synthetic users."""

from __future__ import annotations

import secrets
import shutil
import threading
import time
from datetime import date
from typing import Any

from pydantic import ValidationError

from base.errors import NotFound
from catalogue.service import RuleService
from kvadrupel.container import Container
from kvadrupel.settings import Settings
from kvadrupel.synthetic import users as synthetic_users
from rules.models import RuleIn


def install_pack(svc: RuleService, pack: list[dict[str, Any]]) -> None:
    """Create the built-in rules, or save a new version where the source changed."""
    for spec in pack:
        rule = RuleIn.model_validate({k: v for k, v in spec.items() if k in RuleIn.model_fields})
        try:
            cur = svc.get(rule.key)
        except NotFound:
            svc.create(rule, author="builtin")
            continue
        if cur["source"] != rule.source:
            # A holdout (and content variants) an analyst set on a built-in rule
            # outlives a new pack version.
            keep = {f: cur.get(f) for f in ("holdout", "salt") if f not in spec}
            new = rule.model_copy(update=keep)
            if cur.get("variants") and "variants" not in spec:
                try:
                    new = RuleIn.model_validate(
                        new.model_dump(mode="json") | {"variants": cur["variants"]})
                except ValidationError:  # the pack's content no longer fits them
                    pass
            svc.update(rule.key, new, author="builtin")


def ensure_tokens(settings: Settings) -> dict[str, str]:
    """Keep tokens given in the environment; generate the missing ones."""
    generated = {}
    for role in ("admin", "ingest", "portal"):
        if not getattr(settings, f"{role}_token"):
            token = secrets.token_urlsafe(24)
            setattr(settings, f"{role}_token", token)
            generated[role] = token
    return generated


def run_demo(settings: Settings, *, users: int, host: str, port: int, serve: bool,
             as_of: date | None = None) -> int:
    from rules.pack import BUILTIN_RULES
    from scheduler.planner import start_run

    t0 = time.perf_counter()
    if settings.embedded_storage:
        # The demo owns its data folder: start from a clean slate each time.
        shutil.rmtree(settings.data_dir, ignore_errors=True)
    generated = ensure_tokens(settings)
    container = Container(settings)
    as_of = as_of or container.clock.today()
    stop = threading.Event()
    try:
        container.migrate()
        install_pack(container.rules, BUILTIN_RULES)
        admin_password = _demo_admin(container)
        shards = container.shards
        batch: dict[int, list[tuple[int, dict[str, Any]]]] = {}
        for uid, doc in synthetic_users(users, as_of):
            batch.setdefault(shards.router.shard_of(uid), []).append((uid, doc))
        for s, docs in batch.items():
            for i in range(0, len(docs), 5000):
                shards.stores[s].put_profiles(docs[i : i + 5000])
        t_load = time.perf_counter()
        threads = container.start_workers(stop)
        run_id = start_run(
            shards, container.runs, container.bus, as_of, settings.range_target_users
        )
        info = container.runs.wait(run_id, timeout=3600)
        bus = container.bus
        if hasattr(bus, "join"):
            bus.join(bus.topic("results"), "kvadrupel-deliver", timeout=600)
        t_run = time.perf_counter()
        sent = container.ledger.counts().get("sent", 0)
        _print_summary(settings, info, users, len(container.rules.active()), sent,
                       t_load - t0, t_run - t_load, generated)
        if serve:
            print(
                f"  admin UI       http://{host}:{port}/admin/  "
                f"user 'admin', password {admin_password}",
                flush=True,
            )
        if serve:
            _serve(container, settings, host, port)
        stop.set()
        for t in threads:
            t.join(timeout=10)
        return 0 if info["status"] == "done" else 1
    finally:
        stop.set()
        container.close()


def run_embedded(settings: Settings, *, host: str, port: int) -> int:
    """``kvadrupel embedded``: the API and the ingest, evaluate and deliver workers in
    one process, on whatever the settings name (by default everything embedded under
    ``data_dir``). Unlike the demo it keeps its data: a restart resumes, and the
    in-process bus's durable log hands the workers what was queued before it (events
    acknowledged with 202 but not yet applied included)."""
    from kvadrupel.preflight import check_settings

    generated = ensure_tokens(settings)
    check_settings(settings, "api")  # URLs, token lengths: one line per problem
    container = Container(settings)
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        container.migrate()
        threads = container.start_workers(stop)
        print(f"Kvadrupel (one process), data dir {settings.data_dir.resolve()}", flush=True)
        for role, token in generated.items():
            print(f"  generated {role} token {token}", flush=True)
        _serve(container, settings, host, port)
        return 0
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        container.close()


def _demo_admin(container: Container) -> str:
    """An admin account for the demo's admin UI, with a fresh password each run."""
    from api.admin.store import AccountStore

    password = secrets.token_urlsafe(12)
    AccountStore(container.control, container.clock).add("admin", password, "admin")
    return password


def _print_summary(settings: Settings, info: dict[str, Any], users: int, n_rules: int, sent: int,
                   load_s: float, run_s: float, generated: dict[str, str]) -> None:
    lines = [
        "",
        "Kvadrupel demo (embedded: SQLite shards, in-process bus, mail outbox)",
        f"  data dir       {settings.data_dir.resolve()}",
        f"  as of          {info['as_of']}",
        f"  users          {info['users']:,} (generated {users:,})",
        f"  rules          {n_rules}",
        f"  run            #{info['id']} {info['status']}, {info['ranges']['done']} ranges",
        "  matches per rule:",
    ]
    for key, n in sorted(info["matches"].items(), key=lambda kv: -kv[1]):
        lines.append(f"    {key:<34} {n:>8,}")
    if info["errors"]:
        lines.append(f"  rule errors    {info['errors']}")
    lines += [
        f"  e-mails        {sent:,} (outbox: {settings.data_dir.resolve() / 'outbox'})",
        f"  seconds        load {load_s:.1f}, nightly run {run_s:.1f} "
        f"({info['users'] / max(run_s, 1e-9):,.0f} users/s)",
    ]
    if generated:
        lines.append("  generated tokens (set KVADRUPEL_<ROLE>_TOKEN to choose your own):")
        for role, token in generated.items():
            lines.append(f"    {role:<7} {token}")
    print("\n".join(lines), flush=True)


def _serve(container: Container, settings: Settings, host: str, port: int) -> None:
    import uvicorn

    from api.app import create_app

    print(f"\nServing http://{host}:{port}  (docs: /docs, health: /healthz). Ctrl-C stops.\n"
          f"  curl -H 'Authorization: Bearer {settings.portal_token}' "
          f"http://{host}:{port}/v1/users/1000001/banners", flush=True)
    uvicorn.run(create_app(container), host=host, port=port, log_config=None, access_log=False)
