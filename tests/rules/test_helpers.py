"""The helper library rules see as globals (rules/helpers.py)."""

from __future__ import annotations

import calendar
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rules import helpers as h
from rules.context import make_context
from tests.rules.profiles import json_values

FAST = settings(max_examples=150, deadline=None)
dates = st.dates(min_value=date(1900, 1, 1), max_value=date(2100, 12, 31))


def ctx(day: date):
    return make_context(day)


# -- date() -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-02-29", date(2024, 2, 29)),
        (" 2024-05-10 ", date(2024, 5, 10)),
        ("2024-05-10T23:30:00+03:00", date(2024, 5, 10)),
        ("2024-05-10 08:00", date(2024, 5, 10)),
        ("2024-05-10T10:00:00Z", date(2024, 5, 10)),
        (date(2024, 5, 10), date(2024, 5, 10)),
        (datetime(2024, 5, 10, 23, 0, tzinfo=UTC), date(2024, 5, 10)),
        (None, None),
        ("", None),
        ("2023-02-29", None),
        ("2024-13-01", None),
        ("20240510", None),
        ("2024-W19-5", None),
        ("not a date", None),
        ("2024-05-10" + "x" * 100, None),
        (20240510, None),
        (True, None),
        ([], None),
        ({}, None),
    ],
)
def test_date_parses_iso_input_and_gives_none_for_anything_else(value, expected) -> None:
    # Given a value from a profile / When read as a date / Then ISO forms parse, the rest is None
    assert h.date(value) == expected


@FAST
@given(dates)
def test_date_round_trips_iso_strings_and_caches_them(d: date) -> None:
    # Given any date as an ISO string / When parsed twice / Then both give the date
    assert h.date(d.isoformat()) == d
    assert h.date(d.isoformat()) == d


# -- days_until / days_since -------------------------------------------------------


@FAST
@given(dates, dates)
def test_days_until_and_since_agree_with_date_arithmetic(target: date, today: date) -> None:
    # Given a target date and an evaluation day
    c = ctx(today)

    # When counted in days, from the ISO string as well as from the date
    # Then it is plain date subtraction, in both directions
    assert h.days_until(target.isoformat(), c) == (target - today).days
    assert h.days_until(target, c) == (target - today).days
    assert h.days_since(target.isoformat(), c) == (today - target).days
    assert h.days_since(datetime.combine(target, datetime.min.time()), c) == (today - target).days


def test_day_counts_of_missing_dates_are_none() -> None:
    # Given no date / Then neither count raises
    assert h.days_until(None, ctx(date(2024, 1, 1))) is None
    assert h.days_since("garbage", ctx(date(2024, 1, 1))) is None


# -- age / is_birthday -------------------------------------------------------------


def _birthday_in(birth: date, year: int) -> date:
    if birth.month == 2 and birth.day == 29 and not calendar.isleap(year):
        return date(year, 2, 28)
    return birth.replace(year=year)


@settings(max_examples=300, deadline=None)
@given(dates, st.integers(min_value=1, max_value=120))
def test_birthday_happens_once_a_year_and_age_increments_on_it(birth: date, years: int) -> None:
    # Given a birth date and a later year (29 February birthdays included)
    year = birth.year + years
    if year > 9998:
        return
    day = _birthday_in(birth, year)

    # When we look at the birthday and the days around it
    before, after = day - timedelta(days=1), day + timedelta(days=1)

    # Then it is a birthday on that day only, and the age goes up by one on it
    assert h.is_birthday(birth, ctx(day))
    assert not h.is_birthday(birth, ctx(before))
    assert not h.is_birthday(birth.isoformat(), ctx(after))
    assert h.age(birth, ctx(day)) == years
    assert h.age(birth, ctx(before)) == years - 1
    assert h.age(birth, ctx(after)) == years


@pytest.mark.parametrize(
    ("today", "expected"),
    [
        (date(2023, 2, 28), True),  # common year: celebrated on 28 February
        (date(2023, 3, 1), False),
        (date(2024, 2, 28), False),  # leap year: on the 29th
        (date(2024, 2, 29), True),
        (date(2100, 2, 28), True),  # 2100 is not a leap year
    ],
)
def test_29_february_birthdays_move_to_28_february_in_common_years(
    today: date, expected: bool
) -> None:
    # Given someone born on 29 February 2000 / Then the birthday falls as documented
    assert h.is_birthday("2000-02-29", ctx(today)) is expected


def test_age_and_birthday_of_odd_input() -> None:
    # Given missing, invalid or future birth dates / Then no age and no birthday
    c = ctx(date(2024, 5, 10))
    assert h.age(None, c) is None and h.age("nope", c) is None and h.age("2030-01-01", c) is None
    assert h.age("2024-05-10", c) == 0
    assert not h.is_birthday("2024-05-10", c)  # the day of birth is not a birthday
    assert not h.is_birthday(None, c)


# -- calendar helpers ------------------------------------------------------------------


@FAST
@given(dates, st.integers(min_value=-2400, max_value=2400))
def test_add_months_clamps_to_the_end_of_the_month(d: date, n: int) -> None:
    # Given a date and a number of months / When added
    got = h.add_months(d, n)

    # Then the month moved by n and the day is kept or clamped to the month's end
    assert got is not None
    assert (got.year * 12 + got.month) - (d.year * 12 + d.month) == n
    assert got.day == min(d.day, calendar.monthrange(got.year, got.month)[1])


@FAST
@given(dates, st.integers(min_value=-100_000, max_value=100_000))
def test_add_days_is_timedelta_addition(d: date, n: int) -> None:
    # Given a date and a number of days / Then add_days is d + n days (None out of range)
    try:
        expected = d + timedelta(days=n)
    except OverflowError:
        expected = None
    assert h.add_days(d.isoformat(), n) == expected


def test_calendar_helpers_of_odd_input() -> None:
    # Given odd input / Then None, never an exception
    assert h.add_days("2024-01-01", "3") is None and h.add_days(None, 3) is None
    assert h.add_days("9999-12-31", 1) is None
    assert h.add_months("2024-01-31", 1.5) is None and h.add_months("9999-12-01", 1) is None
    assert h.month("2024-05-10") == 5 and h.month(None) is None
    assert h.weekday("2024-05-10") == 4 and h.weekday("x") is None  # a Friday


def test_between_compares_inclusively_and_never_raises() -> None:
    # Given values that compare, and some that do not / Then between is inclusive or False
    assert h.between(5, 1, 5) and h.between(date(2024, 1, 1), date(2023, 1, 1), date(2025, 1, 1))
    assert not h.between(6, 1, 5)
    assert not h.between(None, 1, 5) and not h.between(3, None, 5)
    assert not h.between(date(2024, 1, 1), "2023-01-01", "2025-01-01")


def test_count_and_any_of() -> None:
    # Given containers and options / Then count is a length or 0, any_of a membership test
    assert (
        h.count([1, 2]) == 2 and h.count({"a": 1}) == 1 and h.count(None) == 0 and h.count(5) == 0
    )
    assert (
        h.any_of("ru", "ru", "by") and not h.any_of("en", "ru", "by") and not h.any_of(None, "ru")
    )


# -- get / has ------------------------------------------------------------------------


def _reference_get(obj, path, default=None):
    """The obvious walk get() must agree with."""
    if path == "":
        return obj
    for part in path.split("."):
        if isinstance(obj, dict) and part in obj:
            obj = obj[part]
        elif isinstance(obj, list) and part.isdigit() and part.isascii() and int(part) < len(obj):
            obj = obj[int(part)]
        else:
            return default
    return obj


def _paths(obj, prefix=""):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str) and "." not in k and k:
                yield from _paths(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, f"{prefix}.{i}" if prefix else str(i))


@settings(max_examples=200, deadline=None)
@given(json_values, st.data())
def test_get_walks_like_the_reference(doc, data) -> None:
    # Given a random JSON document and a path into it (existing or not)
    existing = list(_paths(doc))
    path = data.draw(st.one_of(st.sampled_from(existing), st.text(alphabet="abx0.1", max_size=8)))

    # When it is read with get() / Then it is the very object the reference walk finds
    missing = object()
    assert h.get(doc, path, missing) is _reference_get(doc, path, missing)
    assert h.has(doc, path) is (_reference_get(doc, path) is not None)


def test_get_of_odd_paths() -> None:
    # Given a profile / Then odd paths give the default, lists index by digits only
    doc = {"a": {"b": [10, {"c": None}]}, "1": "one"}
    assert h.get(doc, "a.b.0") == 10 and h.get(doc, "a.b.1.c", "d") is None
    assert h.get(doc, "a.b.-1") is None and h.get(doc, "a.b.5", 7) == 7
    assert h.get(doc, "1") == "one" and h.get(doc, None, 3) == 3 and h.get(doc, "") is doc
    assert h.get(None, "a", 1) == 1 and h.get("str", "a") is None
    assert h.get(doc, "a.b." + "9" * 5000) is None
