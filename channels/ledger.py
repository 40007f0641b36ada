"""The notification ledger: the single source of truth for "was it sent".

One row per (user, rule, episode, channel). Inserting the row *claims* the
message; a second claim of the same key (a redelivered result, a re-run range, a
restarted worker) finds the row and sends nothing. The row keeps the rendered
message (``payload``: content, category, the why-data) so everything after the
claim works from the ledger alone.

Statuses::

    pending ──send──> sent
       │ ├─transient failure──> pending (next_attempt_at: backoff + jitter)
       │ └─permanent failure / max_attempts──> failed   (the dead letter, with the cause)
       ├─quiet hours / over the cap (defer)──> held ──when due──> (checked again)
       ├─opted out──> suppressed        ├─over the cap (drop)──> dropped
       └─episode ended before sending──> cancelled

``due()`` returns pending and held rows whose time has come, including claims a
crashed worker never finished (a claim's ``next_attempt_at`` starts
``claim_timeout_s`` ahead), and pushes their time back by that much so another
worker does not take them meanwhile (on PostgreSQL also ``SKIP LOCKED``).

Between sending and recording ``sent`` there is a window where a crash means the
message is sent again on recovery (neither SMTP nor the push providers have an
idempotent send): the ``Message-ID`` (e-mail) and the collapse key (push) are
derived from the ledger key, so the receiving side can drop or collapse the
duplicate. Nothing is ever sent twice under a *different* identity.

Every timestamp comes from ``clock`` (a controllable clock in tests).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Engine, and_, bindparam, func, or_, select, text, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite

from base.clock import SYSTEM
from shards.schema import ledger

__all__ = ["Claim", "Ledger", "Outcome", "OPEN", "STATUSES"]

STATUSES = ("pending", "held", "sent", "failed", "suppressed", "dropped", "cancelled")
OPEN = ("pending", "held")  # not final: due() picks these up
_CHUNK = 500


@dataclass(frozen=True, slots=True)
class Claim:
    user_id: int
    rule_key: str
    episode: int
    channel: str
    version: int
    run_id: int | None
    payload: dict[str, Any]
    attempts: int = 0  # failed attempts so far (0 for a fresh claim)
    status: str = "pending"
    reason: str | None = None

    @property
    def key(self) -> tuple[int, str, int, str]:
        return (self.user_id, self.rule_key, self.episode, self.channel)

    @property
    def critical(self) -> bool:
        return bool(self.payload.get("critical"))

    @property
    def category(self) -> str:
        return str(self.payload.get("category") or "general")


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one send attempt (see :meth:`Ledger.record`)."""

    claim: Claim
    ok: bool
    permanent: bool = False
    error: str | None = None
    payload: dict[str, Any] | None = field(
        default=None
    )  # replaces the stored one (retry fewer devices)


def _key_clause(c: Claim) -> Any:
    return and_(ledger.c.user_id == c.user_id, ledger.c.rule_key == c.rule_key,
                ledger.c.episode == c.episode, ledger.c.channel == c.channel)


# status IN (pending, held), without an expanding parameter (usable with executemany)
_IS_OPEN = or_(ledger.c.status == "pending", ledger.c.status == "held")
_KEY_PARAMS = and_(
    ledger.c.user_id == bindparam("k_user"),
    ledger.c.rule_key == bindparam("k_rule"),
    ledger.c.episode == bindparam("k_episode"),
    ledger.c.channel == bindparam("k_channel"),
)


_PG_CLAIM = text("""
INSERT INTO ledger (user_id, rule_key, episode, channel, version, status, attempts, run_id,
                    payload, next_attempt_at, created_at, category, critical)
SELECT u, r, e, c, v, 'pending', 0, run, p, :nxt, :ts, cat, crit
FROM unnest(CAST(:u AS bigint[]), CAST(:r AS text[]), CAST(:e AS integer[]), CAST(:c AS text[]),
            CAST(:v AS integer[]), CAST(:run AS integer[]),
            ARRAY(SELECT j FROM jsonb_array_elements(CAST(:p AS jsonb)) WITH ORDINALITY AS a(j, n)
                  ORDER BY n),
            CAST(:cat AS text[]), CAST(:crit AS boolean[])) AS x(u, r, e, c, v, run, p, cat, crit)
ON CONFLICT DO NOTHING
RETURNING user_id, rule_key, episode, channel
""")


_PG_SENT = text("""
UPDATE ledger SET status = 'sent', sent_at = :ts, finished_at = :ts, attempts = attempts + 1,
                  error = NULL, reason = NULL, next_attempt_at = NULL
FROM unnest(CAST(:u AS bigint[]), CAST(:r AS text[]), CAST(:e AS integer[]),
            CAST(:c AS text[])) AS k(u, r, e, c)
WHERE ledger.user_id = k.u AND ledger.rule_key = k.r AND ledger.episode = k.e
  AND ledger.channel = k.c AND ledger.status <> 'sent'
""")


def _key_params(c: Claim) -> dict[str, Any]:
    return {
        "k_user": c.user_id,
        "k_rule": c.rule_key,
        "k_episode": c.episode,
        "k_channel": c.channel,
    }


class Ledger:
    def __init__(self, control: Engine, max_attempts: int = 8, base_delay_s: float = 2.0,
                 max_delay_s: float = 900.0, *, claim_timeout_s: float = 300.0,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.control = control
        self.max_attempts = max_attempts
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.claim_timeout = timedelta(seconds=claim_timeout_s)
        self.clock = clock or SYSTEM.now
        self._pg = control.dialect.name == "postgresql"

    def _insert(self) -> Any:
        return postgresql.insert(ledger) if self._pg else sqlite.insert(ledger)

    def retry_delay(self, attempts: int) -> float:
        """Seconds before attempt ``attempts + 1``: exponential, capped, with jitter."""
        delay: float = min(self.max_delay_s, self.base_delay_s * 2 ** max(attempts - 1, 0))
        return delay * random.uniform(0.5, 1.0)  # jitter: spread a recovering server's load

    # -- claiming -----------------------------------------------------------------
    def claim(self, claims: Sequence[Claim]) -> list[Claim]:
        """Insert new rows; return the claims this call won (to be handled now)."""
        claims = list({c.key: c for c in reversed(claims)}.values())[::-1]  # first of each key
        if not claims:
            return []
        ts = self.clock()
        if self._pg:
            return self._claim_pg(claims, ts)
        rows = [
            {
                "user_id": c.user_id,
                "rule_key": c.rule_key,
                "episode": c.episode,
                "channel": c.channel,
                "version": c.version,
                "status": "pending",
                "attempts": 0,
                "run_id": c.run_id,
                "payload": c.payload,
                "next_attempt_at": ts + self.claim_timeout,
                "created_at": ts,
                "category": c.category,
                "critical": c.critical,
            }
            for c in claims
        ]
        stmt = self._insert().on_conflict_do_nothing().returning(
            ledger.c.user_id, ledger.c.rule_key, ledger.c.episode, ledger.c.channel)
        won: set[tuple[int, str, int, str]] = set()
        with self.control.begin() as conn:
            for i in range(0, len(rows), _CHUNK):
                won.update(tuple(r) for r in conn.execute(stmt, rows[i:i + _CHUNK]))
        return [c for c in claims if c.key in won]

    def _claim_pg(self, claims: list[Claim], ts: datetime) -> list[Claim]:
        # One short statement over arrays (unnest) instead of a multi-row VALUES list:
        # PostgreSQL parses and plans it once, whatever the batch size.
        won: set[tuple[int, str, int, str]] = set()
        with self.control.begin() as conn:
            for i in range(0, len(claims), 5000):
                part = claims[i:i + 5000]
                rows = conn.execute(_PG_CLAIM, {
                    "u": [c.user_id for c in part], "r": [c.rule_key for c in part],
                    "e": [c.episode for c in part], "c": [c.channel for c in part],
                    "v": [c.version for c in part], "run": [c.run_id for c in part],
                    # The payloads as one JSON array (a text[] of JSON documents would
                    # have every quote in them escaped, per element, by the driver).
                    "p": orjson.dumps([c.payload for c in part]).decode(),
                    "cat": [c.category for c in part], "crit": [c.critical for c in part],
                    "nxt": ts + self.claim_timeout, "ts": ts,
                })
                won.update(tuple(r) for r in rows)
        return [c for c in claims if c.key in won]

    def due(self, limit: int = 500) -> list[Claim]:
        """Open rows whose time has come (retries, held messages, abandoned claims)."""
        ts = self.clock()
        stmt = (select(ledger).where(ledger.c.status.in_(OPEN) & (ledger.c.next_attempt_at <= ts))
                .order_by(ledger.c.next_attempt_at).limit(limit))
        if self._pg:
            stmt = stmt.with_for_update(skip_locked=True)
        with self.control.begin() as conn:
            rows = conn.execute(stmt).all()
            if rows:
                keys = [(r.user_id, r.rule_key, r.episode, r.channel) for r in rows]
                for i in range(0, len(keys), _CHUNK):
                    conn.execute(update(ledger).where(
                        tuple_(ledger.c.user_id, ledger.c.rule_key, ledger.c.episode,
                               ledger.c.channel).in_(keys[i:i + _CHUNK])
                    ).values(next_attempt_at=ts + self.claim_timeout))
        return [Claim(r.user_id, r.rule_key, r.episode, r.channel, r.version, r.run_id,
                      r.payload or {}, r.attempts, r.status, r.reason) for r in rows]

    # -- decisions before sending ------------------------------------------------------
    def hold(self, items: Iterable[tuple[Claim, datetime, str]]) -> None:
        """Hold open claims until a time (quiet hours, a deferred cap):
        ``(claim, until, reason)``."""
        params = [_key_params(c) | {"until": until, "reason": reason} for c, until, reason in items]
        if not params:
            return
        with self.control.begin() as conn:
            conn.execute(update(ledger).where(_KEY_PARAMS & _IS_OPEN).values(
                status="held", next_attempt_at=bindparam("until"), reason=bindparam("reason")),
                params)

    def finish(self, items: Iterable[tuple[Claim, str, str]]) -> None:
        """Close open claims without sending: ``(claim, status, reason)``, status one of
        suppressed | dropped | cancelled | failed."""
        ts = self.clock()
        params = [_key_params(c) | {"st": status, "reason": reason} for c, status, reason in items]
        if not params:
            return
        with self.control.begin() as conn:
            conn.execute(update(ledger).where(_KEY_PARAMS & _IS_OPEN).values(
                status=bindparam("st"), reason=bindparam("reason"), next_attempt_at=None,
                finished_at=ts), params)

    def cancel_episodes(self, keys: Iterable[tuple[int, str, int]]) -> int:
        """The episodes ended: close their unsent messages (``cancelled``)."""
        keys = list(dict.fromkeys(keys))
        if not keys:
            return 0
        ts = self.clock()
        n = 0
        with self.control.begin() as conn:
            for i in range(0, len(keys), _CHUNK):
                res = conn.execute(
                    update(ledger)
                    .where(
                        tuple_(ledger.c.user_id, ledger.c.rule_key, ledger.c.episode).in_(
                            keys[i : i + _CHUNK]
                        )
                        & ledger.c.status.in_(OPEN)
                    )
                    .values(
                        status="cancelled",
                        reason="episode ended before sending",
                        next_attempt_at=None,
                        finished_at=ts,
                    )
                )
                n += res.rowcount or 0
        return n

    def recent_sends(self, pairs: Iterable[tuple[int, str]], since: datetime
                     ) -> dict[tuple[int, str], list[datetime]]:
        """Sent times (oldest first) of non-critical messages per (user, channel) after
        ``since``."""
        pairs = set(pairs)
        if not pairs:
            return {}
        users = sorted({u for u, _ in pairs})
        channels = sorted({ch for _, ch in pairs})
        out: dict[tuple[int, str], list[datetime]] = {}
        with self.control.connect() as conn:
            for i in range(0, len(users), _CHUNK):
                rows = conn.execute(
                    select(ledger.c.user_id, ledger.c.channel, ledger.c.sent_at).where(
                        ledger.c.user_id.in_(users[i:i + _CHUNK]) & ledger.c.channel.in_(channels)
                        & (ledger.c.status == "sent") & ledger.c.critical.is_(False)
                        & (ledger.c.sent_at > since))
                ).all()
                for r in rows:
                    if (r.user_id, r.channel) in pairs:
                        out.setdefault((r.user_id, r.channel), []).append(r.sent_at)
        for times in out.values():
            times.sort()
        return out

    # -- after sending ----------------------------------------------------------------
    def record(self, outcomes: Sequence[Outcome | tuple[Claim, bool, bool, str | None]]) -> None:
        """One :class:`Outcome` (or ``(claim, ok, permanent, error)``) per attempted send.

        Transient failures are retried after :meth:`retry_delay`; a permanent one, or
        the ``max_attempts``-th, is ``failed`` (the dead letter) with the cause.
        """
        if not outcomes:
            return
        ts = self.clock()
        sent: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        for o in outcomes:
            if not isinstance(o, Outcome):
                o = Outcome(*o)
            c = o.claim
            if o.ok:
                sent.append(_key_params(c))
                continue
            attempts = c.attempts + 1
            error = (o.error or "")[:2000]
            payload = o.payload if o.payload is not None else c.payload
            if o.permanent or attempts >= self.max_attempts:
                failed.append(
                    _key_params(c)
                    | {
                        "st": "failed",
                        "att": attempts,
                        "err": error,
                        "nxt": None,
                        "fin": ts,
                        "reason": "permanent failure"
                        if o.permanent
                        else f"gave up after {attempts} attempts",
                        "pl": payload,
                    }
                )
            else:
                failed.append(_key_params(c) | {
                    "st": "pending", "att": attempts, "err": error, "fin": None, "reason": "retry",
                    "nxt": ts + timedelta(seconds=self.retry_delay(attempts)), "pl": payload})
        with self.control.begin() as conn:
            if sent and self._pg:
                conn.execute(
                    _PG_SENT,
                    {
                        "u": [k["k_user"] for k in sent],
                        "r": [k["k_rule"] for k in sent],
                        "e": [k["k_episode"] for k in sent],
                        "c": [k["k_channel"] for k in sent],
                        "ts": ts,
                    },
                )
            elif sent:
                conn.execute(update(ledger).where(_KEY_PARAMS & (ledger.c.status != "sent")).values(
                    status="sent", sent_at=ts, finished_at=ts, attempts=ledger.c.attempts + 1,
                    error=None, reason=None, next_attempt_at=None), sent)
            if failed:
                conn.execute(
                    update(ledger)
                    .where(_KEY_PARAMS & _IS_OPEN)
                    .values(
                        status=bindparam("st"),
                        attempts=bindparam("att"),
                        error=bindparam("err"),
                        next_attempt_at=bindparam("nxt"),
                        finished_at=bindparam("fin"),
                        reason=bindparam("reason"),
                        payload=bindparam("pl", type_=ledger.c.payload.type),
                    ),
                    failed,
                )

    # -- reading ------------------------------------------------------------------------
    def counts(self, rule_key: str | None = None, run_id: int | None = None,
               channel: str | None = None) -> dict[str, int]:
        """``{status: n}``, for one rule and/or run and/or channel."""
        stmt = select(ledger.c.status, func.count()).group_by(ledger.c.status)
        stmt = self._filter(stmt, rule_key, run_id, channel)
        with self.control.connect() as conn:
            return {s: int(n) for s, n in conn.execute(stmt).all()}

    def summary(self, rule_key: str | None = None, run_id: int | None = None) -> dict[str, Any]:
        """``{channel: {status: n}}`` and ``{channel: {reason: n}}`` for the closed-unsent ones."""
        stmt = select(ledger.c.channel, ledger.c.status, ledger.c.reason, func.count()).group_by(
            ledger.c.channel, ledger.c.status, ledger.c.reason)
        stmt = self._filter(stmt, rule_key, run_id, None)
        statuses: dict[str, dict[str, int]] = {}
        reasons: dict[str, dict[str, int]] = {}
        with self.control.connect() as conn:
            for ch, st, reason, n in conn.execute(stmt).all():
                per = statuses.setdefault(ch, {})
                per[st] = per.get(st, 0) + int(n)
                if st not in ("sent", "pending") and reason:
                    rs = reasons.setdefault(ch, {})
                    rs[reason] = rs.get(reason, 0) + int(n)
        return {"channels": statuses, "reasons": reasons}

    def dead_letters(self, rule_key: str | None = None, run_id: int | None = None,
                     limit: int = 100) -> list[dict[str, Any]]:
        """Failed messages (permanent or out of attempts), newest first, with the cause."""
        stmt = select(ledger.c.user_id, ledger.c.rule_key, ledger.c.episode, ledger.c.channel,
                      ledger.c.version, ledger.c.run_id, ledger.c.attempts, ledger.c.error,
                      ledger.c.reason, ledger.c.created_at, ledger.c.finished_at).where(
            ledger.c.status == "failed").order_by(ledger.c.finished_at.desc()).limit(limit)
        stmt = self._filter(stmt, rule_key, run_id, None)
        with self.control.connect() as conn:
            return [_jsonable(dict(r._mapping)) for r in conn.execute(stmt).all()]

    @staticmethod
    def _filter(stmt: Any, rule_key: str | None, run_id: int | None, channel: str | None) -> Any:
        if rule_key:
            stmt = stmt.where(ledger.c.rule_key == rule_key)
        if run_id is not None:
            stmt = stmt.where(ledger.c.run_id == run_id)
        if channel:
            stmt = stmt.where(ledger.c.channel == channel)
        return stmt

    def entries(self, user_id: int, rule_key: str | None = None,
                episode: int | None = None) -> list[dict[str, Any]]:
        stmt = select(ledger).where(ledger.c.user_id == user_id)
        if rule_key is not None:
            stmt = stmt.where(ledger.c.rule_key == rule_key)
        if episode is not None:
            stmt = stmt.where(ledger.c.episode == episode)
        with self.control.connect() as conn:
            rows = conn.execute(stmt.order_by(ledger.c.created_at)).all()
        return [dict(r._mapping) for r in rows]


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in d.items()}
