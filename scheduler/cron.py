"""Cron expressions for the nightly job, and "when should it last have fired".

``KVADRUPEL_NIGHTLY_CRON`` is a standard crontab line (minute hour day month
weekday), or six fields with seconds first (``*/2 * * * * *``: handy in tests).
Weekdays follow crontab (0 or 7 = Sunday; names ``mon``..``sun`` work too):
APScheduler 3 counts 0 as Monday, so numbers are translated to names here.
An empty value, ``off`` or ``-`` disables the nightly job.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger

__all__ = ["cron_trigger", "last_fire_time", "nightly_enabled"]

_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def nightly_enabled(expr: str) -> bool:
    return expr.strip().lower() not in ("", "off", "-", "none")


def _weekday(field: str) -> str:
    out = []
    for item in field.split(","):
        base, slash, step = item.partition("/")
        if not base.replace("-", "").isdigit():
            out.append(item)  # "*", names, "*/2"
            continue
        if slash:
            raise ValueError(f"weekday {item!r}: write steps over weekday names, e.g. mon-fri/2")
        lo, _, hi = base.partition("-")
        a, b = int(lo), int(hi or lo)
        if not (0 <= a <= 7 and 0 <= b <= 7) or (hi and a > b):
            raise ValueError(f"weekday {item!r} out of range (0-7, 0 and 7 = Sunday)")
        if not hi:
            out.append(_NAMES[a])
        elif a == 0:  # 0-5: Sunday, then Monday..Friday (APScheduler ranges do not wrap)
            out += ["sun"] + ([f"mon-{_NAMES[b]}"] if b >= 1 else [])
        else:
            out.append(f"{_NAMES[a]}-{_NAMES[b]}")
    return ",".join(out)


def cron_trigger(expr: str, tz: str) -> CronTrigger:
    """A trigger for a 5-field crontab line, or 6 fields with seconds first."""
    fields = expr.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise ValueError(f"cron {expr!r}: expected 5 fields (or 6 with seconds first)")
    second, minute, hour, day, month, weekday = fields
    return CronTrigger(second=second, minute=minute, hour=hour, day=day, month=month,
                       day_of_week=_weekday(weekday), timezone=ZoneInfo(tz))


def last_fire_time(trigger: CronTrigger, now: datetime, lookback_s: float) -> datetime | None:
    """The latest fire time ``<= now`` within ``lookback_s`` seconds, or None."""
    window = 1.0
    while True:
        t: datetime | None = trigger.get_next_fire_time(None, now - timedelta(seconds=window))
        if t is not None and t <= now:
            break
        if window >= lookback_s:
            return None
        window = min(window * 8, lookback_s)
    while True:
        nxt: datetime | None = trigger.get_next_fire_time(t, t + timedelta(microseconds=1))
        if nxt is None or nxt > now:
            return t
        t = nxt
