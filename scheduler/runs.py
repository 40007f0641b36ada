"""Runs and their ranges in the control database.

A run is a set of user ranges (per shard) evaluated as of one date. Marking a
range done is idempotent (a redone range after a crash overwrites its own
figures, it does not add to them), and the run flips to ``done`` (or
``done_with_errors`` when ranges were parked) with the last range.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Engine, func, select, update

from kvadrupel.errors import NotFound
from shards.schema import run_ranges, runs

__all__ = ["RunService"]


def _now() -> datetime:
    return datetime.now(UTC)


class RunService:
    def __init__(self, control: Engine, max_attempts: int = 3) -> None:
        self.control = control
        self.max_attempts = max_attempts

    def create(self, as_of: date, ranges: list[tuple[int, int, int]]) -> int:
        """``ranges``: (shard, lo, hi). Returns the run id."""
        ts = _now()
        with self.control.begin() as conn:
            run_id = conn.execute(runs.insert().values(
                as_of=as_of, status="running" if ranges else "done", ranges_total=len(ranges),
                created_at=ts, finished_at=None if ranges else ts,
            ).returning(runs.c.id)).scalar_one()
            if ranges:
                conn.execute(run_ranges.insert(), [
                    {"run_id": run_id, "range_no": i, "shard": s, "lo": lo, "hi": hi,
                     "status": "pending", "users": 0, "matches": {}, "errors": {},
                     "attempts": 0, "updated_at": ts}
                    for i, (s, lo, hi) in enumerate(ranges)
                ])
        return int(run_id)

    def range_status(self, run_id: int, range_no: int) -> str | None:
        with self.control.connect() as conn:
            return conn.execute(select(run_ranges.c.status).where(
                (run_ranges.c.run_id == run_id) & (run_ranges.c.range_no == range_no))).scalar()

    def range_done(self, run_id: int, range_no: int, users: int, matches: dict[str, int],
                   errors: dict[str, int]) -> None:
        with self.control.begin() as conn:
            conn.execute(update(run_ranges).where(
                (run_ranges.c.run_id == run_id) & (run_ranges.c.range_no == range_no)
            ).values(status="done", users=users, matches=matches, errors=errors,
                     updated_at=_now()))
            self._maybe_finish(conn, run_id)

    def range_failed(self, run_id: int, range_no: int, error: str) -> bool:
        """Count a failed attempt; park the range after ``max_attempts``.
        Returns True when the range should be retried."""
        with self.control.begin() as conn:
            attempts = conn.execute(select(run_ranges.c.attempts).where(
                (run_ranges.c.run_id == run_id) & (run_ranges.c.range_no == range_no))).scalar()
            if attempts is None:
                return False
            attempts += 1
            parked = attempts >= self.max_attempts
            conn.execute(update(run_ranges).where(
                (run_ranges.c.run_id == run_id) & (run_ranges.c.range_no == range_no)
            ).values(attempts=attempts, error=error[:2000],
                     status="parked" if parked else "pending", updated_at=_now()))
            if parked:
                self._maybe_finish(conn, run_id)
            return not parked

    def _maybe_finish(self, conn: Any, run_id: int) -> None:
        counts = dict(conn.execute(select(run_ranges.c.status, func.count()).where(
            run_ranges.c.run_id == run_id).group_by(run_ranges.c.status)).all())
        if counts.get("pending", 0):
            return
        status = "done_with_errors" if counts.get("parked", 0) else "done"
        conn.execute(update(runs).where((runs.c.id == run_id) & (runs.c.status == "running"))
                     .values(status=status, finished_at=_now()))

    def get(self, run_id: int) -> dict[str, Any]:
        with self.control.connect() as conn:
            run = conn.execute(select(runs).where(runs.c.id == run_id)).first()
            if run is None:
                raise NotFound(f"no run {run_id}")
            ranges = conn.execute(select(run_ranges).where(run_ranges.c.run_id == run_id)
                                  .order_by(run_ranges.c.range_no)).all()
        matches: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        users = 0
        done = 0
        parked = []
        for r in ranges:
            if r.status == "done":
                done += 1
                users += r.users
                matches.update(r.matches)
                errors.update(r.errors)
            elif r.status == "parked":
                parked.append({"range": r.range_no, "shard": r.shard, "error": r.error})
        elapsed = ((run.finished_at or _now()) - _aware(run.created_at)).total_seconds()
        rate = users / elapsed if elapsed > 0 else 0.0
        remaining = run.ranges_total - done - len(parked)
        eta = (elapsed / done * remaining) if done and remaining else 0.0
        return {
            "id": run.id, "as_of": run.as_of.isoformat(), "status": run.status,
            "users": users, "matches": dict(sorted(matches.items())),
            "errors": dict(sorted(errors.items())),
            "ranges": {"total": run.ranges_total, "done": done, "parked": len(parked)},
            "parked": parked, "users_per_s": round(rate, 1), "eta_s": round(eta, 1),
            "created_at": _aware(run.created_at).isoformat(),
            "finished_at": _aware(run.finished_at).isoformat() if run.finished_at else None,
        }

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        with self.control.connect() as conn:
            ids = conn.execute(select(runs.c.id).order_by(runs.c.id.desc()).limit(limit)).scalars().all()
        return [self.get(i) for i in ids]

    def wait(self, run_id: int, timeout: float = 60.0) -> dict[str, Any]:
        """Block until the run is no longer running (CLI and tests)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.get(run_id)
            if info["status"] != "running" or time.monotonic() > deadline:
                return info
            time.sleep(0.05)


def _aware(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts
