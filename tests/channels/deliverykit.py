"""A delivery worker on real parts, driven step by step, with a controllable clock.

``make_rig(settings, ...)`` builds the container's storage and bus, a ledger and a
channel policy on a :class:`FakeClock`, an SMTP mailer (to the ``smtp_server``
fixture) and a :class:`~engine.deliver.worker.DeliveryWorker`. Tests publish rule
results (``enter(...)``/``exit_(...)``) and ``drain()`` the worker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from channels.ledger import Ledger
from channels.mailers.smtp import SmtpMailer
from channels.policy import ChannelPolicy
from channels.push import Pusher
from engine.deliver.worker import DeliveryWorker
from kvadrupel.container import Container
from kvadrupel.factories import unsubscriber_from_settings
from kvadrupel.settings import Settings
from tests.fixtures.waiting import scaled

MAIL_FROM = "Kvadrupel <noreply@kvadrupel.test>"
AS_OF = "2026-11-24"
TOKENS = {"admin_token": "adm-" + "x" * 20, "ingest_token": "ing-" + "y" * 20,
          "portal_token": "por-" + "z" * 20}
# 12:00 in Moscow: outside any quiet hours the tests configure.
NOON_MSK = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self, now: datetime = NOON_MSK) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> datetime:
        self.now += timedelta(**kw)
        return self.now

    def set(self, when: datetime) -> None:
        self.now = when


def enter(
    uid: int,
    rule: str = "r1",
    episode: int = 1,
    *,
    version: int = 1,
    email: bool = True,
    banner: bool = True,
    category: str | None = None,
    critical: bool = False,
    tz: str | None = None,
    expires_at: str | None = None,
    push: dict | None = None,
    run_id: int | None = None,
    lang: str | None = None,
    to: str | None = None,
) -> dict[str, Any]:
    flags = {"category": category or "general", "critical": critical}
    b = (
        {"title": f"{rule} title", "body": f"{rule} body", "link": "/x", **flags}
        if banner
        else None
    )
    if b is not None and expires_at:
        b["expires_at"] = expires_at
    e = ({"subject": f"{rule} for {uid}", "text": f"Hello {uid}, {rule} episode {episode}.",
          "html": f"<html><body><p>Hello {uid}, <b>{rule}</b></p></body></html>",
          "to": to or f"user{uid}@example.org", **flags} if email else None)
    p = (
        {"title": f"{rule} push", "body": "tap", "link": "/x", **flags, **(push or {})}
        if push
        else None
    )
    return {"kind": "enter", "user_id": uid, "rule": rule, "episode": episode, "version": version,
            "priority": 100, "as_of": AS_OF, "run_id": run_id, "banner": b, "email": e, "push": p,
            "lang": lang, "user_lang": lang, "tz": tz,
            "why": {"fields": {"driver_license.expires_on": "2026-12-10"}, "missing": [],
                    "matched": True}}


def exit_(uid: int, rule: str = "r1", episode: int = 1, version: int = 1) -> dict[str, Any]:
    return {"kind": "exit", "user_id": uid, "rule": rule, "episode": episode, "version": version,
            "priority": 100, "as_of": AS_OF, "run_id": None}


@dataclass
class Rig:
    container: Container
    worker: DeliveryWorker
    clock: FakeClock
    ledger: Ledger
    extra_workers: list[DeliveryWorker] = field(default_factory=list)

    @property
    def bus(self) -> Any:
        return self.container.bus

    def publish(self, *results: dict[str, Any]) -> None:
        topic = self.bus.topic("results")
        for r in results:
            self.bus.publish(topic, orjson.dumps(r), key=str(r["user_id"]).encode())
        self.bus.flush()

    def drain(self, timeout: float = 10.0, chores: bool = True) -> int:
        """Process until the worker has nothing more; then run the due chores once."""
        handled = 0
        idle = 0
        deadline = time.monotonic() + scaled(timeout)
        while time.monotonic() < deadline:
            n = self.worker.step()
            handled += n
            idle = idle + 1 if n == 0 else 0
            if idle >= (2 if self._memory else 15):
                break
        if chores:
            self.worker.run_chores()
        return handled

    @property
    def _memory(self) -> bool:
        return type(self.bus).__name__ == "MemoryBus"

    def statuses(self, uid: int | None = None) -> dict[tuple[int, str, int, str], str]:
        from sqlalchemy import select

        from shards.schema import ledger

        stmt = select(ledger.c.user_id, ledger.c.rule_key, ledger.c.episode, ledger.c.channel,
                      ledger.c.status)
        if uid is not None:
            stmt = stmt.where(ledger.c.user_id == uid)
        with self.container.control.connect() as conn:
            return {(r[0], r[1], r[2], r[3]): r[4] for r in conn.execute(stmt)}

    def banners(self, uid: int) -> list[dict[str, Any]]:
        return self.container.shards.for_user(uid).banners(uid)[1]

    def close(self) -> None:
        for w in [self.worker, *self.extra_workers]:
            try:
                w.close()
            except Exception:  # noqa: BLE001 - closing twice
                pass
        self.container.close()


def backend_settings(request: Any, tmp_path: Any, smtp_url: str) -> Settings:
    """The settings of a ``rig`` fixture parametrized "sqlite" / "postgres" (two
    PostgreSQL shards from the ``pg_factory`` fixture)."""
    if request.param == "sqlite":
        return embedded_settings(tmp_path, smtp_url=smtp_url)
    return pg_settings(tmp_path, request.getfixturevalue("pg_factory")(2), smtp_url=smtp_url)


def make_rig(settings: Settings, *, smtp_url: str | None = None, clock: FakeClock | None = None,
             policy: ChannelPolicy | None = None, pusher: Pusher | None = None,
             max_attempts: int = 4, base_delay_s: float = 1.0, claim_timeout_s: float = 60.0,
             bus: Any = None, concurrency: int = 4) -> Rig:
    clock = clock or FakeClock()
    container = Container(settings, bus_override=bus)
    container.migrate()
    ledger = Ledger(container.control, max_attempts, base_delay_s, 60.0,
                    claim_timeout_s=claim_timeout_s, clock=clock)
    url = smtp_url or settings.smtp_url
    mailer = SmtpMailer(url, MAIL_FROM, timeout=5, concurrency=concurrency)
    worker = make_worker(container, ledger, mailer, clock, policy, pusher)
    return Rig(container, worker, clock, ledger)


def make_worker(
    container: Container,
    ledger: Ledger,
    mailer: Any,
    clock: FakeClock,
    policy: ChannelPolicy | None = None,
    pusher: Pusher | None = None,
) -> DeliveryWorker:
    consumer = container.bus.consumer(container.group("deliver"), [container.bus.topic("results")])
    worker = DeliveryWorker(
        consumer,
        container.bus,
        container.shards,
        ledger,
        mailer,
        pusher=pusher,
        policy=policy or ChannelPolicy(caps={}, quiet=None),
        unsubscriber=unsubscriber_from_settings(container.settings),
        clock=clock,
    )
    if type(container.bus).__name__ == "MemoryBus":
        worker.poll_timeout = 0.005  # drain() polls until empty: keep idle polls short
    return worker


def embedded_settings(tmp_path: Any, **kw: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", **TOKENS, **kw)


def pg_settings(tmp_path: Any, dbs: Any, **kw: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", shards=dbs.shards, control_db=dbs.control,
                    **TOKENS, **kw)


def message_ids(smtp: Any) -> list[str]:
    return [str(r.message["Message-ID"]) for r in smtp.messages]
