"""The notification ledger: the single source of truth for "was it sent".

One row per (user, rule, episode, channel). Inserting the row *claims* the
message; a second claim of the same key (a redelivered result, a re-run range, a
restarted worker) finds the row and sends nothing. The row keeps the rendered
message so transient failures are retried from the ledger itself, with
exponential backoff and jitter, until ``max_attempts``; then it is ``failed``.

Between claiming and marking ``sent`` there is a window where a crash means the
message may be sent again on recovery (SMTP has no idempotent send): the
``Message-ID`` is derived from the ledger key so a receiving system can drop the
duplicate.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, func, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite

from shards.schema import ledger

__all__ = ["Claim", "Ledger"]


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Claim:
    user_id: int
    rule_key: str
    episode: int
    channel: str
    version: int
    run_id: int | None
    payload: dict[str, Any]

    @property
    def key(self) -> tuple[int, str, int, str]:
        return (self.user_id, self.rule_key, self.episode, self.channel)


class Ledger:
    def __init__(self, control: Engine, max_attempts: int = 8, base_delay_s: float = 2.0,
                 max_delay_s: float = 900.0) -> None:
        self.control = control
        self.max_attempts = max_attempts
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s

    def _insert(self) -> Any:
        if self.control.dialect.name == "postgresql":
            return postgresql.insert(ledger)
        return sqlite.insert(ledger)

    def claim(self, claims: Sequence[Claim]) -> list[Claim]:
        """Insert new rows; return the claims this call won (to be sent now)."""
        if not claims:
            return []
        ts = _now()
        won: list[Claim] = []
        with self.control.begin() as conn:
            for c in claims:
                res = conn.execute(
                    self._insert().values(
                        user_id=c.user_id, rule_key=c.rule_key, episode=c.episode, channel=c.channel,
                        version=c.version, status="pending", attempts=0, run_id=c.run_id,
                        payload=c.payload, next_attempt_at=ts + timedelta(minutes=5),
                        created_at=ts,
                    ).on_conflict_do_nothing().returning(ledger.c.user_id)
                )
                if res.first() is not None:
                    won.append(c)
        return won

    def due(self, limit: int = 200) -> list[Claim]:
        """Pending rows whose retry time has come (including claims a crashed
        worker never finished). Each returned row's next attempt is pushed back,
        so two workers sweeping at once rarely pick the same row."""
        ts = _now()
        with self.control.begin() as conn:
            rows = conn.execute(
                select(ledger).where((ledger.c.status == "pending") & (ledger.c.next_attempt_at <= ts))
                .order_by(ledger.c.next_attempt_at).limit(limit)
            ).all()
            if rows:
                keys = [(r.user_id, r.rule_key, r.episode, r.channel) for r in rows]
                conn.execute(update(ledger).where(
                    tuple_(ledger.c.user_id, ledger.c.rule_key, ledger.c.episode, ledger.c.channel).in_(keys)
                ).values(next_attempt_at=ts + timedelta(minutes=5)))
        return [Claim(r.user_id, r.rule_key, r.episode, r.channel, r.version, r.run_id, r.payload)
                for r in rows]

    def record(self, outcomes: Sequence[tuple[Claim, bool, bool, str | None]]) -> None:
        """``(claim, ok, permanent, error)`` per attempted send."""
        if not outcomes:
            return
        ts = _now()
        with self.control.begin() as conn:
            for c, ok, permanent, error in outcomes:
                where = and_(ledger.c.user_id == c.user_id, ledger.c.rule_key == c.rule_key,
                             ledger.c.episode == c.episode, ledger.c.channel == c.channel)
                if ok:
                    conn.execute(update(ledger).where(where).values(
                        status="sent", sent_at=ts, attempts=ledger.c.attempts + 1, error=None,
                        next_attempt_at=None))
                    continue
                attempts = conn.execute(select(ledger.c.attempts).where(where)).scalar() or 0
                attempts += 1
                if permanent or attempts >= self.max_attempts:
                    conn.execute(update(ledger).where(where).values(
                        status="failed", attempts=attempts, error=(error or "")[:2000],
                        next_attempt_at=None))
                else:
                    delay = min(self.max_delay_s, self.base_delay_s * 2 ** (attempts - 1))
                    delay *= random.uniform(0.5, 1.0)  # jitter: spread a recovering server's load
                    conn.execute(update(ledger).where(where).values(
                        attempts=attempts, error=(error or "")[:2000],
                        next_attempt_at=ts + timedelta(seconds=delay)))

    def counts(self, rule_key: str | None = None) -> dict[str, int]:
        stmt = select(ledger.c.status, func.count()).group_by(ledger.c.status)
        if rule_key:
            stmt = stmt.where(ledger.c.rule_key == rule_key)
        with self.control.connect() as conn:
            return {s: int(n) for s, n in conn.execute(stmt).all()}

    def entries(self, user_id: int) -> list[dict[str, Any]]:
        with self.control.connect() as conn:
            rows = conn.execute(select(ledger).where(ledger.c.user_id == user_id)
                                .order_by(ledger.c.created_at)).all()
        return [dict(r._mapping) for r in rows]
