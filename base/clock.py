"""The one clock: every "now" and "today" of a process comes from a :class:`Clock`.

Production runs on the system clock. A test, a drill or a replay *pins* it once
(``KVADRUPEL_CLOCK_START`` or ``Clock.pinned``): the clock then starts at that
instant and advances in real time, so timeouts and backoffs behave as usual while
every date-dependent decision — the evaluator's ``today``, banner expiry, quiet
hours, caps, engagement days, JWT expiry, runs and audit timestamps — sees the
same pinned calendar.

What does *not* follow the clock, by design: monotonic timers (durations, not
dates), APScheduler's own trigger times (it reads the system clock; the dates it
hands to runs come from here), and timestamps that third parties check against
their own clocks (FCM OAuth assertions, webhook signatures), which must be real.
"""

from __future__ import annotations

import time as _time
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

__all__ = ["Clock", "SYSTEM"]


class Clock:
    """Current time, optionally pinned to a start instant.

    ``now()`` is aware UTC; ``today()`` is the date in the installation's time
    zone (``tz``), or in the zone given.
    """

    __slots__ = ("_offset", "tz", "zone")

    def __init__(self, tz: str = "UTC", *, start: datetime | None = None) -> None:
        self.tz = tz
        self.zone = ZoneInfo(tz)
        # A pinned clock is the system clock plus a fixed offset: the offset is taken
        # once, so the pinned clock advances exactly as the real one does.
        self._offset = 0.0
        if start is not None:
            if start.tzinfo is None:
                start = start.replace(tzinfo=self.zone)
            self._offset = start.timestamp() - _time.time()

    @classmethod
    def pinned(cls, when: date | datetime, tz: str = "UTC") -> Clock:
        """A clock that starts at ``when`` (a date means its midnight in ``tz``)."""
        if not isinstance(when, datetime):
            when = datetime(when.year, when.month, when.day)
        return cls(tz, start=when)

    @property
    def is_pinned(self) -> bool:
        return self._offset != 0.0

    def time(self) -> float:
        """Seconds since the epoch (``time.time()`` on this clock)."""
        return _time.time() + self._offset

    def now(self) -> datetime:
        """The current instant, aware, in UTC."""
        return datetime.fromtimestamp(self.time(), UTC)

    def local_now(self, tz: str | None = None) -> datetime:
        """The current instant in ``tz`` (default: the installation's zone)."""
        return datetime.fromtimestamp(self.time(), ZoneInfo(tz) if tz else self.zone)

    def today(self, tz: str | None = None) -> date:
        """Today's date in ``tz`` (default: the installation's zone)."""
        return self.local_now(tz).date()

    def shifted(self, delta: timedelta) -> Clock:
        """A copy of this clock moved by ``delta`` (for tests that step days)."""
        c = Clock(self.tz)
        c._offset = self._offset + delta.total_seconds()
        return c

    def __repr__(self) -> str:
        return f"Clock({self.tz!r}, now={self.now().isoformat()}, pinned={self.is_pinned})"


SYSTEM = Clock()
"""The system clock in UTC, for code that has no installation clock handed to it
(library defaults); processes build their own from settings (the container)."""
