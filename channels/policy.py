"""Who may be sent what, and when: preferences, quiet hours, frequency caps.

:meth:`ChannelPolicy.decide` looks at messages that are about to go out (fresh
claims and due ledger rows alike, so every attempt is checked again) and says
for each, in this order:

1. **preferences** — the user opted out of the channel or of the message's
   category → ``suppress`` (closed, never sent);
2. **quiet hours** — the user's local time (``tz`` of the message: the profile's
   ``timezone``, else the deployment's, Europe/Moscow by default) is inside the
   window → ``hold`` until the window ends (plus a per-user offset of up to
   ``quiet_spread_s``, so the morning does not start with one burst). Held
   messages are sent when the window opens, never lost;
3. **frequency cap** — at most ``caps[channel]`` messages per user per channel per
   rolling ``cap_window_s``, across rules; messages of a ``critical`` rule are
   exempt and do not count. Over the cap, by ``cap_policy``: ``defer`` → ``hold``
   until enough earlier messages leave the window; ``drop`` → closed as
   ``dropped``. Both are counted (metrics and the ledger);
4. otherwise ``send``.

Caps are checked against the ledger's ``sent`` times plus what this batch already
decided to send; two workers deciding for one user at the same moment can exceed
a cap by the messages in flight (results are keyed by user, so fresh messages of
one user go through one worker).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from channels.ledger import Claim
from channels.preferences import ALLOW_ALL, Preferences
from shards.router import bucket_of

__all__ = ["ChannelPolicy", "Decision", "parse_quiet_hours"]

_HM = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


def parse_quiet_hours(text: str) -> tuple[time, time] | None:
    """``"22:00-08:00"`` → (22:00, 08:00); empty → None (no quiet hours)."""
    if not text or not text.strip():
        return None
    m = _HM.match(text)
    if not m:
        raise ValueError(f"quiet hours must look like 22:00-08:00, got {text!r}")
    h1, m1, h2, m2 = (int(x) for x in m.groups())
    if not (0 <= h1 <= 23 and 0 <= h2 <= 23 and 0 <= m1 <= 59 and 0 <= m2 <= 59):
        raise ValueError(f"quiet hours out of range: {text!r}")
    start, end = time(h1, m1), time(h2, m2)
    if start == end:
        return None
    return start, end


@lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


@dataclass(frozen=True, slots=True)
class Decision:
    claim: Claim
    action: str  # send | hold | suppress | drop
    reason: str | None = None
    until: datetime | None = None


@dataclass
class ChannelPolicy:
    caps: Mapping[str, int] = field(default_factory=lambda: {"email": 3, "push": 5})
    cap_window_s: float = 86400.0
    cap_policy: str = "defer"  # defer | drop
    quiet: tuple[time, time] | None = None
    quiet_channels: frozenset[str] = frozenset({"email", "push"})
    quiet_spread_s: int = 0
    default_tz: str = "Europe/Moscow"

    def __post_init__(self) -> None:
        if self.cap_policy not in ("defer", "drop"):
            raise ValueError(f"cap policy must be defer or drop, got {self.cap_policy!r}")
        _zone(self.default_tz)

    # -- quiet hours -------------------------------------------------------------------
    def quiet_until(self, now: datetime, tz: str | None, user_id: int) -> datetime | None:
        """When the quiet window that ``now`` is in ends (UTC), or None if not quiet."""
        if self.quiet is None:
            return None
        start, end = self.quiet
        zone = _zone(tz) if tz else _zone(self.default_tz)
        local = now.astimezone(zone)
        t = local.time().replace(tzinfo=None)
        inside = (start <= t or t < end) if start > end else (start <= t < end)
        if not inside:
            return None
        day = local.date() if t < end else local.date() + timedelta(days=1)
        opens = datetime.combine(day, end, zone).astimezone(UTC)
        if self.quiet_spread_s > 0:
            opens += timedelta(seconds=bucket_of(user_id, 1 << 20) % self.quiet_spread_s)
        return opens

    # -- the decision --------------------------------------------------------------------
    def decide(
        self,
        claims: Sequence[Claim],
        now: datetime,
        prefs: Mapping[int, Preferences],
        recent: Callable[[set[tuple[int, str]], datetime], dict[tuple[int, str], list[datetime]]],
    ) -> list[Decision]:
        """One :class:`Decision` per claim, in order. ``recent(pairs, since)`` gives the
        sent times per (user, channel) in the window (the ledger's)."""
        out: list[Decision | None] = [None] * len(claims)
        capped: list[int] = []
        for i, c in enumerate(claims):
            ok, why = prefs.get(c.user_id, ALLOW_ALL).allows(c.channel, c.category)
            if not ok:
                out[i] = Decision(c, "suppress", why)
                continue
            if c.channel in self.quiet_channels:
                until = self.quiet_until(now, c.payload.get("tz"), c.user_id)
                if until is not None:
                    out[i] = Decision(c, "hold", "quiet hours", until)
                    continue
            if c.critical or not self.caps.get(c.channel):
                out[i] = Decision(c, "send")
                continue
            capped.append(i)
        if capped:
            window = timedelta(seconds=self.cap_window_s)
            pairs = {(claims[i].user_id, claims[i].channel) for i in capped}
            sent = recent(pairs, now - window)
            for i in capped:
                c = claims[i]
                times = sent.setdefault((c.user_id, c.channel), [])
                cap = self.caps[c.channel]
                if len(times) < cap:
                    times.append(now)
                    out[i] = Decision(c, "send")
                    continue
                reason = f"frequency cap: {cap} {c.channel} per {_span(self.cap_window_s)}"
                if self.cap_policy == "drop":
                    out[i] = Decision(c, "drop", reason)
                else:
                    # The slot frees when the (n - cap + 1)-th newest send leaves the window.
                    times.sort()
                    frees = times[len(times) - cap] + window
                    out[i] = Decision(c, "hold", reason, max(frees, now + timedelta(seconds=1)))
        return [d for d in out if d is not None]


def _span(seconds: float) -> str:
    if seconds % 86400 == 0:
        n = int(seconds // 86400)
        return "day" if n == 1 else f"{n} days"
    if seconds % 3600 == 0:
        n = int(seconds // 3600)
        return "hour" if n == 1 else f"{n} hours"
    return f"{seconds:g} s"
