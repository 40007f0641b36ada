"""Banner impressions and clicks, counted per rule per day at portal scale.

Each API process adds impressions and clicks to an in-memory table keyed by
(rule, day, kind) — a dict increment under a lock, no I/O — and a flusher adds
the table to ``banner_stats`` in the control database every ``flush_s`` seconds
in one transaction (``impressions = impressions + n``), so the database sees one
row write per rule and day per interval, however many impressions there were.

Banners of a rule with content variants (channels/variants.py) carry their
``variant`` in the banner JSON; the portal echoes it with the impression or click,
and the count is also added per variant to ``banner_variant_stats``.

The day is the date in the deployment's time zone. A crash loses at most one
interval of counts of that process (these are statistics, not the ledger); a
failed flush keeps its counts for the next one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, select
from sqlalchemy.dialects import postgresql, sqlite

from shards.schema import banner_stats, banner_variant_stats

__all__ = ["EngagementCounter", "KINDS"]

KINDS = ("impressions", "clicks")


class EngagementCounter:
    def __init__(self, control: Engine, timezone: str = "Europe/Moscow", flush_s: float = 5.0,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.control = control
        self.zone = ZoneInfo(timezone)
        self.flush_s = flush_s
        self.clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        # (rule, variant or "", day, kind) -> n
        self._counts: dict[tuple[str, str, date, str], int] = {}
        self._last_flush = time.monotonic()
        self.flushes = 0

    def today(self) -> date:
        return self.clock().astimezone(self.zone).date()

    def add(self, rule_key: str, kind: str, n: int = 1, variant: str | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(kind)
        key = (rule_key, variant or "", self.today(), kind)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + n

    def flush_due(self) -> bool:
        return time.monotonic() - self._last_flush >= self.flush_s

    def pending(self) -> dict[tuple[str, str, date, str], int]:
        with self._lock:
            return dict(self._counts)

    def flush(self) -> int:
        """Add the counts to the database; return how many (rule, day) rows were written."""
        with self._flush_lock:
            self._last_flush = time.monotonic()
            with self._lock:
                counts, self._counts = self._counts, {}
            if not counts:
                return 0
            rows: dict[tuple[str, date], dict[str, Any]] = {}
            per_variant: dict[tuple[str, str, date], dict[str, Any]] = {}
            for (rule, variant, day, kind), n in counts.items():
                row = rows.setdefault((rule, day), {"rule_key": rule, "day": day,
                                                    "impressions": 0, "clicks": 0})
                row[kind] += n
                if variant:
                    vrow = per_variant.setdefault((rule, variant, day), {
                        "rule_key": rule, "variant": variant, "day": day,
                        "impressions": 0, "clicks": 0})
                    vrow[kind] += n
            pg = self.control.dialect.name == "postgresql"
            insert = postgresql.insert if pg else sqlite.insert
            ins = insert(banner_stats)
            stmt = ins.on_conflict_do_update(
                index_elements=["rule_key", "day"],
                set_={"impressions": banner_stats.c.impressions + ins.excluded.impressions,
                      "clicks": banner_stats.c.clicks + ins.excluded.clicks})
            vins = insert(banner_variant_stats)
            vstmt = vins.on_conflict_do_update(
                index_elements=["rule_key", "variant", "day"],
                set_={"impressions": banner_variant_stats.c.impressions
                      + vins.excluded.impressions,
                      "clicks": banner_variant_stats.c.clicks + vins.excluded.clicks})
            try:
                with self.control.begin() as conn:
                    conn.execute(
                        stmt, sorted(rows.values(), key=lambda r: (r["rule_key"], r["day"]))
                    )
                    if per_variant:
                        conn.execute(vstmt, [per_variant[k] for k in sorted(per_variant)])
            except Exception:
                with self._lock:  # keep them for the next flush
                    for key, n in counts.items():
                        self._counts[key] = self._counts.get(key, 0) + n
                raise
            self.flushes += 1
            return len(rows)

    def stats(self, rule_key: str, since: date, until: date) -> list[dict[str, Any]]:
        """Per-day impressions, clicks and click-through rate, including counts of
        this process not flushed yet."""
        with self.control.connect() as conn:
            rows = conn.execute(select(banner_stats).where(
                (banner_stats.c.rule_key == rule_key) & (banner_stats.c.day >= since)
                & (banner_stats.c.day <= until))).all()
        days: dict[date, dict[str, int]] = {
            r.day: {"impressions": int(r.impressions), "clicks": int(r.clicks)} for r in rows}
        for (rule, _, day, kind), n in self.pending().items():
            if rule == rule_key and since <= day <= until:
                days.setdefault(day, {"impressions": 0, "clicks": 0})[kind] += n
        out = []
        d = since
        while d <= until:
            v = days.get(d, {"impressions": 0, "clicks": 0})
            ctr = v["clicks"] / v["impressions"] if v["impressions"] else None
            out.append({"day": d.isoformat(), **v, "ctr": ctr})
            d += timedelta(days=1)
        return out


    def variant_stats(self, rule_key: str, since: date, until: date) -> dict[str, dict[str, Any]]:
        """Impressions, clicks and click-through rate per content variant over the
        days, including counts of this process not flushed yet."""
        with self.control.connect() as conn:
            rows = conn.execute(select(banner_variant_stats).where(
                (banner_variant_stats.c.rule_key == rule_key)
                & (banner_variant_stats.c.day >= since)
                & (banner_variant_stats.c.day <= until))).all()
        out: dict[str, dict[str, Any]] = {}
        for r in rows:
            v = out.setdefault(r.variant, {"impressions": 0, "clicks": 0})
            v["impressions"] += int(r.impressions)
            v["clicks"] += int(r.clicks)
        for (rule, variant, day, kind), n in self.pending().items():
            if rule == rule_key and variant and since <= day <= until:
                out.setdefault(variant, {"impressions": 0, "clicks": 0})[kind] += n
        for v in out.values():
            v["ctr"] = v["clicks"] / v["impressions"] if v["impressions"] else None
        return dict(sorted(out.items()))
