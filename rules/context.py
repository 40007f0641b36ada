"""The evaluation context a rule receives as its second argument (``ctx``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["Context", "make_context"]

_FIELDS = ("today", "now", "tz", "rule_key", "rule_version")


@dataclass(frozen=True, slots=True)
class Context:
    """What a rule knows besides the profile. Immutable, so rules cannot change it.

    ``today`` is the evaluation date in ``tz`` (the "as of" date of a run),
    ``now`` a tz-aware datetime in ``tz``, ``rule_key``/``rule_version`` the rule
    being evaluated (:class:`~rules.ruleset.RuleSet` hands every rule its own copy).

    It also reads as a mapping (``keys()``, ``ctx["today"]``) so template code can
    spread it: ``{**ctx}`` gives today, now, tz, rule_key, rule_version and ``ctx``.
    """

    today: date
    now: datetime
    tz: str
    rule_key: str = ""
    rule_version: int = 0

    def keys(self) -> tuple[str, ...]:
        """The names ``{**ctx}`` spreads (the fields, plus ``ctx`` itself)."""
        return (*_FIELDS, "ctx")

    def __getitem__(self, name: str) -> object:
        if name == "ctx":
            return self
        if name in _FIELDS:
            return getattr(self, name)
        raise KeyError(name)


def make_context(
    as_of: date | str | None = None,
    tz: str = "Europe/Moscow",
    now: datetime | None = None,
) -> Context:
    """Build a :class:`Context`.

    * ``as_of`` (a date or an ISO ``YYYY-MM-DD`` string) sets ``today``; without
      it ``today`` is ``now``'s date.
    * ``now``: naive datetimes are taken as wall time in ``tz``, aware ones are
      converted to ``tz``. Without it: midnight of ``as_of`` in ``tz`` when
      ``as_of`` is given (deterministic runs), else the current time.
    * Raises ``ValueError`` for an unknown time zone.
    """
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {tz!r}") from exc
    if isinstance(as_of, str):
        as_of = date.fromisoformat(as_of)
    elif isinstance(as_of, datetime):
        as_of = as_of.date()
    if now is None:
        now = datetime.now(zone) if as_of is None else datetime.combine(as_of, time(0), zone)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=zone)
    else:
        now = now.astimezone(zone)
    return Context(today=as_of if as_of is not None else now.date(), now=now, tz=tz)
