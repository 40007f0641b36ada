"""Runs and their ranges in the control database.

A run is a set of user ranges (per shard) evaluated as of one date, over every
active rule or over a chosen few (a campaign). A range goes

    pending --claim--> running --done--> done
                          |  \\--fail--> pending (retried through the bus) ... --> parked
                          \\-- worker killed: the job is redelivered, claimed again

Every claim counts an attempt, so a range whose worker dies every time (a
poison profile that crashes the process, not only one that raises) is parked
after ``max_attempts`` starts instead of taking the workers down forever. A
parked range keeps its last error and the run ends ``done_with_errors``.

Marking a range done is idempotent: a range redone after a crash overwrites its
own figures, it does not add to them. The run row is locked while a range
finishes, so when the last two ranges finish at once exactly one of them sees
the run complete.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Engine, case, func, null, select, update
from sqlalchemy.exc import IntegrityError

from base.clock import SYSTEM, Clock
from base.errors import NotFound
from engine.messages import VERSION, RangeJob
from shards.schema import run_ranges, runs

__all__ = ["PlannedRange", "RunService"]

FINISHED = ("done", "done_with_errors", "failed")




@dataclass(frozen=True, slots=True)
class PlannedRange:
    shard: int
    lo: int
    hi: int
    est_users: int = 0


class RunService:
    def __init__(self, control: Engine, max_attempts: int = 3, *, clock: Clock = SYSTEM) -> None:
        self.control = control
        self.clock = clock
        self.max_attempts = max_attempts

    # -- creation -------------------------------------------------------------
    def create(self, as_of: date, ranges: Sequence[PlannedRange | tuple[int, int, int]], *,
               kind: str = "manual", rules: Sequence[str] | None = None,
               fire_key: str | None = None, mode: str = "full",
               sweep: Sequence[str] | None = None,
               covers: Mapping[str, int] | None = None) -> tuple[int, bool]:
        """Record a run with its ranges; returns ``(run id, created)``.

        With ``fire_key`` (a scheduler firing: ``nightly@2026-11-24T02:00:00+03:00``)
        the run is made at most once: a second call returns the first run's id and
        ``created=False``, whoever makes it (another replica, a restarted scheduler).
        """
        planned = [r if isinstance(r, PlannedRange) else PlannedRange(*r) for r in ranges]
        ts = self.clock.now()
        try:
            with self.control.begin() as conn:
                run_id = conn.execute(runs.insert().values(
                    as_of=as_of, status="running" if planned else "done",
                    ranges_total=len(planned), created_at=ts, finished_at=None if planned else ts,
                    kind=kind, rules=list(rules) if rules is not None else None, fire_key=fire_key,
                    published_at=None if planned else ts,
                    users_est=sum(r.est_users for r in planned),
                    # SQL NULL, not JSON null: "covers nothing" must not match IS NOT NULL
                    mode=mode, sweep=list(sweep) if sweep else null(),
                    covers=dict(covers) if covers is not None else null(),
                ).returning(runs.c.id)).scalar_one()
                if planned:
                    conn.execute(run_ranges.insert(), [
                        {"run_id": run_id, "range_no": i, "shard": r.shard, "lo": r.lo, "hi": r.hi,
                         "status": "pending", "users": 0, "matches": {}, "errors": {},
                         "attempts": 0, "updated_at": ts, "est_users": r.est_users}
                        for i, r in enumerate(planned)
                    ])
        except IntegrityError:
            if fire_key is None:
                raise
            with self.control.connect() as conn:
                existing = conn.execute(
                    select(runs.c.id).where(runs.c.fire_key == fire_key)
                ).scalar()
            if existing is None:
                raise
            return int(existing), False
        return int(run_id), True

    def mark_published(self, run_id: int) -> None:
        with self.control.begin() as conn:
            conn.execute(update(runs).where(runs.c.id == run_id)
                         .values(published_at=self.clock.now()))

    def unpublished(self, older_than_s: float) -> list[int]:
        """Running runs whose jobs were never handed to the bus (their planner died
        in between), created more than ``older_than_s`` ago."""
        cutoff = datetime.fromtimestamp(self.clock.time() - older_than_s, UTC)
        with self.control.connect() as conn:
            return [int(i) for i in conn.execute(select(runs.c.id).where(
                (runs.c.status == "running") & runs.c.published_at.is_(None)
                & (runs.c.created_at < cutoff))).scalars()]

    def jobs(self, run_id: int) -> list[RangeJob]:
        """The range jobs of a run that still have work (pending or running)."""
        with self.control.connect() as conn:
            run = conn.execute(
                select(runs.c.as_of, runs.c.rules, runs.c.mode, runs.c.sweep)
                .where(runs.c.id == run_id)
            ).first()
            if run is None:
                raise NotFound(f"no run {run_id}")
            rows = conn.execute(select(run_ranges.c.range_no, run_ranges.c.shard, run_ranges.c.lo,
                                       run_ranges.c.hi).where(
                (run_ranges.c.run_id == run_id) & run_ranges.c.status.in_(("pending", "running"))
            ).order_by(run_ranges.c.range_no)).all()
        return [RangeJob(v=VERSION, run_id=run_id, range_no=r.range_no, shard=r.shard, lo=r.lo,
                         hi=r.hi, as_of=run.as_of.isoformat(), rules=run.rules, mode=run.mode,
                         sweep=run.sweep) for r in rows]

    def last_covers(self) -> dict[str, int] | None:
        """The rule versions the latest complete run evaluated (``done``: every range;
        a run with a parked range does not count), or None when there is none."""
        with self.control.connect() as conn:
            covers = conn.execute(
                select(runs.c.covers).where((runs.c.status == "done") & runs.c.covers.is_not(None))
                .order_by(runs.c.id.desc()).limit(1)).scalar()
        return {str(k): int(v) for k, v in covers.items()} if covers is not None else None

    def last_full_check(self) -> date | None:
        """The as-of date of the latest complete run that evaluated every user with
        every rule (mode full or verify)."""
        with self.control.connect() as conn:
            d = conn.execute(
                select(runs.c.as_of).where((runs.c.status == "done") & runs.c.covers.is_not(None)
                                           & runs.c.mode.in_(("full", "verify")))
                .order_by(runs.c.id.desc()).limit(1)).scalar()
        return d if isinstance(d, date) else None

    # -- range life cycle -----------------------------------------------------
    def _where(self, run_id: int, range_no: int) -> Any:
        return (run_ranges.c.run_id == run_id) & (run_ranges.c.range_no == range_no)

    def _lock_run(self, conn: Any, run_id: int) -> None:
        stmt = select(runs.c.id).where(runs.c.id == run_id)
        if conn.dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        conn.execute(stmt)

    def range_status(self, run_id: int, range_no: int) -> str | None:
        with self.control.connect() as conn:
            return conn.execute(
                select(run_ranges.c.status).where(self._where(run_id, range_no))
            ).scalar()

    def claim(self, run_id: int, range_no: int, worker: str) -> int | None:
        """Start an attempt at a range: returns its number (1, 2, ...), or None when the
        range needs no work (done, parked, unknown) or has just been parked because
        ``max_attempts`` attempts started and none finished."""
        with self.control.begin() as conn:
            self._lock_run(conn, run_id)
            row = conn.execute(
                select(run_ranges.c.status, run_ranges.c.attempts, run_ranges.c.error).where(
                    self._where(run_id, range_no)
                )
            ).first()
            if row is None or row.status not in ("pending", "running"):
                return None
            if row.attempts >= self.max_attempts:
                last = row.error or "the worker stopped mid-range (killed?)"
                conn.execute(update(run_ranges).where(self._where(run_id, range_no)).values(
                    status="parked", worker=None, updated_at=self.clock.now(),
                    error=f"gave up after {row.attempts} attempts; last: {last}"[:2000]))
                self._maybe_finish(conn, run_id)
                return None
            attempt: int = row.attempts + 1
            ts = self.clock.now()
            conn.execute(update(run_ranges).where(self._where(run_id, range_no)).values(
                status="running", attempts=attempt, worker=worker, started_at=ts, users=0,
                updated_at=ts))
        return attempt

    def progress(self, run_id: int, range_no: int, worker: str, users: int) -> None:
        """Users evaluated so far by the attempt running on ``worker`` (live progress)."""
        with self.control.begin() as conn:
            conn.execute(update(run_ranges).where(
                self._where(run_id, range_no) & (run_ranges.c.status == "running")
                & (run_ranges.c.worker == worker)
            ).values(users=users, updated_at=self.clock.now()))

    def release(self, run_id: int, range_no: int, worker: str) -> None:
        """Give a claimed range back without counting the attempt (the failure was not
        the range's: the bus or the control DB is down, the worker is stopping)."""
        with self.control.begin() as conn:
            conn.execute(
                update(run_ranges)
                .where(
                    self._where(run_id, range_no)
                    & (run_ranges.c.status == "running")
                    & (run_ranges.c.worker == worker)
                )
                .values(
                    status="pending",
                    worker=None,
                    updated_at=self.clock.now(),
                    attempts=case((run_ranges.c.attempts > 0, run_ranges.c.attempts - 1), else_=0),
                )
            )

    def range_done(self, run_id: int, range_no: int, users: int, matches: dict[str, int],
                   errors: dict[str, int], *, enters: int = 0, exits: int = 0,
                   seconds: float = 0.0, worker: str | None = None,
                   rule_cpu: dict[str, float] | None = None, swept: int = 0,
                   mismatches: int = 0) -> None:
        with self.control.begin() as conn:
            self._lock_run(conn, run_id)
            values: dict[str, Any] = {
                "status": "done", "users": users, "matches": matches, "errors": errors,
                "enters": enters, "exits": exits, "seconds": seconds, "swept": swept,
                "mismatches": mismatches,
                "updated_at": self.clock.now(),
                "rule_cpu": {k: round(v, 6) for k, v in (rule_cpu or {}).items()}}
            if worker is not None:
                values["worker"] = worker
            conn.execute(update(run_ranges).where(self._where(run_id, range_no)).values(**values))
            self._maybe_finish(conn, run_id)

    def range_failed(self, run_id: int, range_no: int, error: str) -> bool:
        """Record a failed attempt. Returns True when the range should be retried
        (its job published again); after ``max_attempts`` it is parked instead."""
        with self.control.begin() as conn:
            self._lock_run(conn, run_id)
            attempts = conn.execute(select(run_ranges.c.attempts).where(
                self._where(run_id, range_no))).scalar()
            if attempts is None:
                return False
            parked = attempts >= self.max_attempts
            conn.execute(update(run_ranges).where(self._where(run_id, range_no)).values(
                error=error[:2000], status="parked" if parked else "pending", worker=None,
                updated_at=self.clock.now()))
            if parked:
                self._maybe_finish(conn, run_id)
            return not parked

    def _maybe_finish(self, conn: Any, run_id: int) -> None:
        counts = dict(conn.execute(select(run_ranges.c.status, func.count()).where(
            run_ranges.c.run_id == run_id).group_by(run_ranges.c.status)).all())
        if counts.get("pending", 0) or counts.get("running", 0):
            return
        status = "done_with_errors" if counts.get("parked", 0) else "done"
        conn.execute(update(runs).where((runs.c.id == run_id) & (runs.c.status == "running"))
                     .values(status=status, finished_at=self.clock.now()))

    # -- reading --------------------------------------------------------------
    def get(self, run_id: int) -> dict[str, Any]:
        """The run's status and figures: ranges done/running/parked of total, users
        evaluated (live, including ranges in progress), users/s, ETA, matches and
        errors per rule, the CPU each rule used (most first; sampled, see
        rules/budget.py), and per-worker throughput."""
        with self.control.connect() as conn:
            run = conn.execute(select(runs).where(runs.c.id == run_id)).first()
            if run is None:
                raise NotFound(f"no run {run_id}")
            ranges = conn.execute(select(run_ranges).where(run_ranges.c.run_id == run_id)
                                  .order_by(run_ranges.c.range_no)).all()
        matches: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        cpu: Counter[str] = Counter()
        users = live = done = running = enters = exits = swept = mismatches = 0
        parked = []
        workers: dict[str, list[float]] = {}
        for r in ranges:
            if r.status == "done":
                done += 1
                users += r.users
                enters += r.enters
                exits += r.exits
                swept += r.swept
                mismatches += r.mismatches
                matches.update(r.matches)
                errors.update(r.errors)
                cpu.update(r.rule_cpu or {})
                if r.worker:
                    w = workers.setdefault(r.worker, [0, 0, 0.0])
                    w[0] += 1
                    w[1] += r.users
                    w[2] += r.seconds
            elif r.status == "running":
                running += 1
                live += r.users
            elif r.status == "parked":
                parked.append({"range": r.range_no, "shard": r.shard, "lo": r.lo, "hi": r.hi,
                               "attempts": r.attempts, "error": r.error})
        created = _aware(run.created_at)
        elapsed = (
            (_aware(run.finished_at) if run.finished_at else self.clock.now()) - created
        ).total_seconds()
        seen = users + live
        rate = seen / elapsed if elapsed > 0 else 0.0
        total = run.ranges_total
        remaining = total - done - len(parked)
        eta: float | None
        if not remaining:
            eta = 0.0
        elif run.users_est and rate > 0:
            eta = max(0.0, (run.users_est - seen) / rate)
        else:
            eta = elapsed / done * remaining if done else None
        return {
            "id": run.id, "as_of": run.as_of.isoformat(), "status": run.status,
            "kind": run.kind, "rules": run.rules, "fire_key": run.fire_key,
            "users": seen, "users_est": run.users_est,
            # Incremental nights: "users" are the users due (and evaluated); the
            # others were skipped (their answers cannot have changed, engine/runs.py).
            "mode": run.mode, "sweep": run.sweep,
            "users_due": seen if run.mode != "full" else None,
            "skipped": max(0, run.users_est - seen) if run.mode != "full" else 0,
            "swept": swept, "mismatches": mismatches,
            "matches": dict(sorted(matches.items())), "errors": dict(sorted(errors.items())),
            "enters": enters, "exits": exits,
            "rule_cpu": {k: {"seconds": round(v, 3),
                             "us_per_user": round(v / users * 1e6, 2) if users else None}
                         for k, v in cpu.most_common()},
            "ranges": {"total": total, "done": done, "running": running, "parked": len(parked)},
            "parked": parked,
            "users_per_s": round(rate, 1), "eta_s": round(eta, 1) if eta is not None else None,
            "workers": {k: {"ranges": int(v[0]), "users": int(v[1]), "seconds": round(v[2], 3),
                            "users_per_s": round(v[1] / v[2], 1) if v[2] > 0 else None}
                        for k, v in sorted(workers.items())},
            "created_at": created.isoformat(),
            "finished_at": _aware(run.finished_at).isoformat() if run.finished_at else None,
        }

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        with self.control.connect() as conn:
            ids = (
                conn.execute(select(runs.c.id).order_by(runs.c.id.desc()).limit(limit))
                .scalars()
                .all()
            )
        return [self.get(i) for i in ids]

    def wait(self, run_id: int, timeout: float = 60.0, poll_s: float = 0.05) -> dict[str, Any]:
        """Block until the run is no longer running (CLI and tests)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.get(run_id)
            if info["status"] != "running" or time.monotonic() > deadline:
                return info
            time.sleep(poll_s)


def _aware(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts
