"""Helpers available as globals in every rule (and documented in docs/rules.md).

All of them are total: missing, ``None`` or malformed input gives ``None`` (or
``False`` for predicates) instead of an exception, so a rule over an incomplete
profile does not fail. They never mutate their arguments and never catch
``BaseException`` (the time-budget interrupt must pass through them).

Dates: :func:`date` accepts ``YYYY-MM-DD`` strings, ISO datetime strings (the date
part as written, no time-zone conversion), ``date`` and ``datetime`` objects.
Parsed strings are kept in a module-level dict (cleared when it reaches
``DATE_CACHE_MAX`` entries): a profile's dates are parsed at most once however many
rules read them, and usually not at all, since the same dates recur across
profiles. bench/bench_sandbox.py measures the alternatives per date read: no cache
~250 ns, ``functools.lru_cache`` ~155 ns, a dict cleared per profile ~120 ns (plus
the clearing, and it needs the evaluator's cooperation), this dict ~120 ns.
"""

from __future__ import annotations

import calendar
from datetime import date as _date
from datetime import datetime as _datetime
from datetime import timedelta as _timedelta
from typing import Any

__all__ = [
    "HELPERS",
    "add_days",
    "add_months",
    "age",
    "any_of",
    "between",
    "count",
    "date",
    "days_since",
    "days_until",
    "get",
    "has",
    "is_birthday",
    "month",
    "weekday",
]

DATE_CACHE_MAX = 1 << 16
PATH_CACHE_MAX = 4096
_MAX_DATE_TEXT = 40  # longer strings are not dates: refuse before parsing (and caching)

_MISS = object()
_date_cache: dict[str, _date | None] = {}
_path_cache: dict[str, tuple[tuple[str, int | None], ...]] = {}


def _parse_date(text: str) -> _date | None:
    s = text.strip()
    n = len(s)
    try:
        if n == 10 and s[4] == "-" and s[7] == "-":
            return _date.fromisoformat(s)
        if 10 < n <= _MAX_DATE_TEXT and s[4] == "-" and s[7] == "-" and s[10] in "T ":
            return _datetime.fromisoformat(s).date()
    except ValueError:
        pass
    return None


def date(x: Any) -> _date | None:
    """``x`` as a ``datetime.date``, or ``None``.

    Accepts ``"YYYY-MM-DD"``, ISO datetime strings (``"2024-05-01T10:00:00+03:00"``:
    the date as written), ``date`` and ``datetime`` objects. ``None``, ``""``,
    invalid dates (``"2023-02-29"``) and any other type give ``None``.
    """
    if type(x) is str:
        d = _date_cache.get(x, _MISS)
        if d is _MISS:
            if len(x) > _MAX_DATE_TEXT:
                return None
            d = _parse_date(x)
            if len(_date_cache) >= DATE_CACHE_MAX:
                _date_cache.clear()
            _date_cache[x] = d
        return d  # type: ignore[return-value]  # not _MISS here: a sentinel is not narrowed
    if type(x) is _date:
        return x
    if isinstance(x, _datetime):
        return x.date()
    if isinstance(x, _date):
        return x
    return None


def days_until(d: Any, ctx: Any) -> int | None:
    """Days from ``ctx.today`` to ``d`` (negative when ``d`` is past); ``None`` if no date."""
    day = date(d)
    if day is None:
        return None
    today: _date = ctx.today
    return (day - today).days


def days_since(d: Any, ctx: Any) -> int | None:
    """Days from ``d`` to ``ctx.today`` (negative when ``d`` is ahead); ``None`` if no date."""
    day = date(d)
    if day is None:
        return None
    today: _date = ctx.today
    return (today - day).days


def _anniversary_key(b: _date, year: int) -> int:
    # month*32 + day of the birthday in ``year``; 29 Feb falls on 28 Feb in common years.
    if b.month == 2 and b.day == 29 and not calendar.isleap(year):
        return 2 * 32 + 28
    return b.month * 32 + b.day


def age(birth: Any, ctx: Any) -> int | None:
    """Age in whole years at ``ctx.today``; ``None`` for no date or a birth date in the future.

    A year is added on the birthday; people born on 29 February add it on
    28 February in common years (the same day :func:`is_birthday` is true).
    """
    b = date(birth)
    if b is None:
        return None
    t: _date = ctx.today
    if b > t:
        return None
    years = t.year - b.year
    if t.month * 32 + t.day < _anniversary_key(b, t.year):
        years -= 1
    return years


def is_birthday(birth: Any, ctx: Any) -> bool:
    """True when ``ctx.today`` is the person's birthday (not the day of birth itself).

    Birthdays on 29 February are celebrated on 28 February in common years.
    """
    b = date(birth)
    if b is None:
        return False
    t: _date = ctx.today
    return t.year > b.year and t.month * 32 + t.day == _anniversary_key(b, t.year)


def month(d: Any) -> int | None:
    """The month (1-12) of ``d``, or ``None``."""
    d = date(d)
    return None if d is None else d.month


def weekday(d: Any) -> int | None:
    """The day of the week of ``d``: 0 = Monday ... 6 = Sunday (as Python's), or ``None``."""
    d = date(d)
    return None if d is None else d.weekday()


def add_days(d: Any, n: Any) -> _date | None:
    """``d`` plus ``n`` days (``n`` may be negative); ``None`` for no date, a non-integer ``n``
    or a result outside years 1..9999."""
    day = date(d)
    if day is None or type(n) is not int:
        return None
    try:
        return day + _timedelta(days=n)
    except OverflowError:
        return None


def add_months(d: Any, n: Any) -> _date | None:
    """``d`` plus ``n`` calendar months, the day clamped to the month's end
    (31 Jan + 1 month = 28/29 Feb); ``None`` for no date, a non-integer ``n`` or out of range."""
    d = date(d)
    if d is None or type(n) is not int:
        return None
    y, m0 = divmod(d.month - 1 + n, 12)
    year = d.year + y
    if not 1 <= year <= 9999:
        return None
    last = calendar.monthrange(year, m0 + 1)[1]
    return _date(year, m0 + 1, min(d.day, last))


def between(x: Any, lo: Any, hi: Any) -> bool:
    """``lo <= x <= hi``; False when any of them is ``None`` or they do not compare
    (e.g. a date with a string: convert with :func:`date` first)."""
    if x is None or lo is None or hi is None:
        return False
    try:
        return bool(lo <= x <= hi)
    except TypeError:
        return False


def _split_path(path: str) -> tuple[tuple[str, int | None], ...]:
    parts = tuple(
        (p, int(p) if p.isdigit() and p.isascii() and len(p) <= 18 else None)
        for p in path.split(".")
    )
    if len(path) <= 256:  # paths are constants in rule sources; do not cache data
        if len(_path_cache) >= PATH_CACHE_MAX:
            _path_cache.clear()
        _path_cache[path] = parts
    return parts


def get(obj: Any, path: Any, default: Any = None) -> Any:
    """The value at dotted ``path`` in ``obj`` (e.g. ``"driver_license.expires_on"``), or
    ``default`` when some step is missing.

    Steps into dicts by key and into lists by index (``"orders.items.0.sku"``: digits
    only, no negatives). A value that is present but ``None`` is returned as ``None``
    (like ``dict.get``). The empty path returns ``obj``. Returns the profile's own
    objects: they are read-only inside rules.
    """
    if type(path) is not str:
        return default
    if not path:
        return obj
    parts = _path_cache.get(path)
    if parts is None:
        parts = _split_path(path)
    cur = obj
    for key, index in parts:
        if isinstance(cur, dict):
            cur = cur.get(key, _MISS)
            if cur is _MISS:
                return default
        elif isinstance(cur, (list, tuple)):
            if index is None or index >= len(cur):
                return default
            cur = cur[index]
        else:
            return default
    return cur


def has(obj: Any, path: Any) -> bool:
    """True when ``path`` exists in ``obj`` and its value is not ``None``."""
    return get(obj, path, None) is not None


def count(x: Any) -> int:
    """The number of items of a list/dict/string (0 for ``None`` or anything else)."""
    if isinstance(x, (list, tuple, dict, str, set, frozenset)):
        return len(x)
    return 0


def any_of(x: Any, *options: Any) -> bool:
    """True when ``x`` equals one of ``options``: ``any_of(get(p, "language"), "ru", "by")``."""
    try:
        return x in options
    except TypeError:
        return False


HELPERS: dict[str, Any] = {
    "date": date,
    "days_until": days_until,
    "days_since": days_since,
    "age": age,
    "is_birthday": is_birthday,
    "month": month,
    "weekday": weekday,
    "add_days": add_days,
    "add_months": add_months,
    "between": between,
    "get": get,
    "has": has,
    "count": count,
    "any_of": any_of,
}
