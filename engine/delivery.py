"""The delivery worker: rule results → banner storage and the e-mail channel.

Banners are level-triggered: ``enter`` stores the user's banner for the rule's
episode, ``exit`` removes it; both are idempotent, so a redelivered result changes
nothing. E-mails are edge-triggered: an ``enter`` with an e-mail claims the
ledger row for (user, rule, episode, "email") and only the claimer sends.
Transient send failures stay in the ledger and are retried from it with backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import date
from typing import Any

import orjson

from channels.ledger import Claim, Ledger
from channels.mail import Email, Mailer
from engine.bus import Bus, Consumer, Message
from engine.worker import BatchWorker
from kvadrupel import metrics
from shards.shardset import ShardSet
from shards.store import BannerChange

__all__ = ["DeliveryWorker"]

log = logging.getLogger("kvadrupel.deliver")


class DeliveryWorker(BatchWorker):
    name = "deliver"
    poll_max = 1000

    def __init__(self, consumer: Consumer, bus: Bus, shards: ShardSet, ledger: Ledger,
                 mailer: Mailer, *, on_banners: Callable[[list[int]], None] | None = None) -> None:
        super().__init__(consumer)
        self.bus = bus
        self.shards = shards
        self.ledger = ledger
        self.mailer = mailer
        self.on_banners = on_banners
        self.loop = asyncio.new_event_loop()
        self.sent = 0
        self.failed = 0

    def process(self, batch: list[Message]) -> None:
        per_shard: dict[int, list[BannerChange]] = {}
        claims: list[Claim] = []
        for msg in batch:
            try:
                r = orjson.loads(msg.value)
                uid = int(r["user_id"])
                change = BannerChange(
                    user_id=uid, rule_key=r["rule"], episode=int(r["episode"]),
                    version=int(r["version"]), priority=int(r.get("priority", 0)),
                    as_of=date.fromisoformat(r["as_of"]),
                    content=r.get("banner") if r["kind"] == "enter" else None,
                )
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                log.error("dead-lettering malformed result at %s/%d@%d: %s",
                          msg.topic, msg.partition, msg.offset, exc)
                self.bus.publish(self.bus.topic("results.dlq"), msg.value, key=msg.key)
                continue
            if r["kind"] == "enter" and change.content is None:
                # An e-mail-only rule: nothing to show, but an older episode's banner
                # (if the rule had one then) must not linger.
                change = BannerChange(uid, change.rule_key, change.episode - 1, change.version,
                                      change.priority, change.as_of, None)
            per_shard.setdefault(self.shards.router.shard_of(uid), []).append(change)
            if r["kind"] == "enter" and r.get("email"):
                claims.append(Claim(uid, r["rule"], int(r["episode"]), "email", int(r["version"]),
                                    r.get("run_id"), r["email"]))
        changed: list[int] = []
        for shard, changes in per_shard.items():
            changed += self.shards.stores[shard].apply_banner_changes(changes)
        if changed and self.on_banners:
            self.on_banners(changed)
        won = self.ledger.claim(claims)
        self._send(won)
        self.bus.flush()

    def idle(self) -> None:
        self._send(self.ledger.due())

    def _send(self, claims: list[Claim]) -> None:
        if not claims:
            return
        emails = [_email(c) for c in claims]
        results = self.loop.run_until_complete(self.mailer.send_many(emails))
        outcomes: list[tuple[Claim, bool, bool, str | None]] = []
        for c, res in zip(claims, results, strict=True):
            outcomes.append((c, res.ok, res.permanent, res.error))
            if res.ok:
                self.sent += 1
            else:
                self.failed += 1
            outcome = "sent" if res.ok else ("permanent_failure" if res.permanent else "transient_failure")
            metrics.DELIVERIES.labels("email", outcome).inc()
        self.ledger.record(outcomes)

    def close(self) -> None:
        super().close()
        try:
            self.loop.run_until_complete(self.mailer.aclose())
        finally:
            self.loop.close()


def _email(c: Claim) -> Email:
    p: dict[str, Any] = c.payload
    return Email(
        to=p["to"], subject=p.get("subject", ""), text=p.get("text", ""), html=p.get("html"),
        headers={"X-Kvadrupel-Rule": f"{c.rule_key}/v{c.version}"},
        message_id=f"<{c.user_id}.{c.rule_key}.{c.episode}@kvadrupel>",
    )
