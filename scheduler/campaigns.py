"""Scheduled campaigns: a run of chosen rules (or of all of them) at a chosen time.

The ``campaigns`` table is the record analysts and the API write; the scheduler
leader mirrors each ``scheduled`` campaign into an APScheduler date job (the
persistent job store) and fires it:

    scheduled --fire--> starting --run made--> started (run_id)
        \\--cancel--> cancelled        \\--error--> failed
        \\--the scheduler was down past the catch-up window--> missed

``scheduled → starting`` is one conditional UPDATE, so a campaign fires once
whoever tries; the run itself is made with the firing key ``campaign:<id>``, so a
leader that died between the two steps is finished by the next one without a
second run.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select, update

from base.clock import SYSTEM, Clock
from base.errors import Conflict, NotFound
from shards.schema import campaigns, rules

__all__ = ["CampaignService", "UnknownRules", "check_rules"]




def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


class UnknownRules(ValueError):
    def __init__(self, keys: Sequence[str]) -> None:
        super().__init__("unknown rules: " + ", ".join(keys))
        self.keys = list(keys)


def check_rules(conn: Any, keys: Sequence[str] | None) -> None:
    """Raise :class:`UnknownRules` unless every key names a rule."""
    if keys is None:
        return
    known = set(conn.execute(select(rules.c.key).where(rules.c.key.in_(list(keys)))).scalars())
    missing = [k for k in keys if k not in known]
    if missing:
        raise UnknownRules(missing)


class CampaignService:
    def __init__(self, control: Engine, clock: Clock = SYSTEM) -> None:
        self.control = control
        self.clock = clock

    def create(self, at: datetime, rule_keys: Sequence[str] | None = None, *,
               as_of: date | None = None, name: str | None = None) -> dict[str, Any]:
        """Schedule a campaign. ``at`` must be time-zone aware; ``rule_keys`` None
        means every active rule at fire time. Raises :class:`UnknownRules`."""
        if at.tzinfo is None:
            raise ValueError("'at' must carry a time zone")
        keys = list(dict.fromkeys(rule_keys)) if rule_keys is not None else None
        ts = self.clock.now()
        with self.control.begin() as conn:
            check_rules(conn, keys)
            cid = conn.execute(campaigns.insert().values(
                name=name or ("campaign: " + ", ".join(keys) if keys else "campaign: all rules"),
                rules=keys, at=_utc(at), as_of=as_of, status="scheduled", run_id=None, error=None,
                created_at=ts, updated_at=ts).returning(campaigns.c.id)).scalar_one()
        return self.get(int(cid))

    def get(self, cid: int) -> dict[str, Any]:
        with self.control.connect() as conn:
            row = conn.execute(select(campaigns).where(campaigns.c.id == cid)).first()
        if row is None:
            raise NotFound(f"no campaign {cid}")
        return _row(row)

    def list(self, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        stmt = select(campaigns).order_by(campaigns.c.at.desc(), campaigns.c.id.desc()).limit(limit)
        if status:
            stmt = stmt.where(campaigns.c.status == status)
        with self.control.connect() as conn:
            return [_row(r) for r in conn.execute(stmt)]

    def cancel(self, cid: int) -> dict[str, Any]:
        with self.control.begin() as conn:
            res = conn.execute(update(campaigns).where(
                (campaigns.c.id == cid) & (campaigns.c.status == "scheduled")
            ).values(status="cancelled", updated_at=self.clock.now()).returning(campaigns.c.id))
            if res.first() is None:
                status = conn.execute(
                    select(campaigns.c.status).where(campaigns.c.id == cid)
                ).scalar()
                if status is None:
                    raise NotFound(f"no campaign {cid}")
                raise Conflict(f"campaign {cid} is {status}; only a scheduled one can be cancelled")
        return self.get(cid)

    # -- the scheduler's side -------------------------------------------------
    # ``list`` is the method above from here on in the class body: builtins.list
    def with_status(self, *statuses: str) -> builtins.list[dict[str, Any]]:
        with self.control.connect() as conn:
            return [_row(r) for r in conn.execute(
                select(campaigns).where(campaigns.c.status.in_(statuses)).order_by(campaigns.c.at))]

    def begin(self, cid: int) -> dict[str, Any] | None:
        """``scheduled → starting``; None when it is not scheduled (any more)."""
        with self.control.begin() as conn:
            res = conn.execute(update(campaigns).where(
                (campaigns.c.id == cid) & (campaigns.c.status == "scheduled")
            ).values(status="starting", updated_at=self.clock.now()).returning(campaigns.c.id))
            if res.first() is None:
                return None
        return self.get(cid)

    def started(self, cid: int, run_id: int) -> None:
        self._set(cid, "starting", status="started", run_id=run_id)

    def failed(self, cid: int, error: str) -> None:
        self._set(cid, "starting", status="failed", error=error[:2000])

    def missed(self, cid: int, late_by: timedelta) -> None:
        self._set(cid, "scheduled", status="missed",
                  error=f"the scheduler was down at the time (late by {late_by}); not run")

    def _set(self, cid: int, expect: str, **values: Any) -> None:
        with self.control.begin() as conn:
            conn.execute(update(campaigns).where(
                (campaigns.c.id == cid) & (campaigns.c.status == expect)
            ).values(updated_at=self.clock.now(), **values))


def _row(r: Any) -> dict[str, Any]:
    return {
        "id": r.id, "name": r.name, "rules": r.rules, "at": _utc(r.at).isoformat(),
        "as_of": r.as_of.isoformat() if r.as_of else None, "status": r.status,
        "run_id": r.run_id, "error": r.error,
        "created_at": _utc(r.created_at).isoformat(), "updated_at": _utc(r.updated_at).isoformat(),
    }
