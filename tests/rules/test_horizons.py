"""Time horizons (rules/horizon.py, rules/horizon_policy.py, RuleSet(horizons=True)).

The invariant: for every date d with today < d < horizon, plain evaluation of the
same profile at as-of d gives the same answer. Unit tests per construct (exact
horizons where the tracking is exact, tomorrow where it records a use it cannot
follow), then property tests over random profiles with the built-in pack, the 50
rules of bench/rules50.py and rules that read ``ctx.today`` directly.
"""

from __future__ import annotations

import random
import textwrap
from datetime import date, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.rules50 import RULES50
from rules.context import make_context
from rules.horizon import CAP, evaluate_tracked, is_tracked, plain, track_context
from rules.pack import BUILTIN_RULES
from rules.ruleset import Outcome, RuleSet, RuleSpec
from rules.sandbox import compile_rule
from tests.rules.profiles import random_profile

AS_OF = date(2024, 5, 10)  # a Friday
DAY = timedelta(days=1)


def _source(body: str) -> str:
    if body.lstrip().startswith(("def ", "AGES", "LIMIT")):
        return textwrap.dedent(body).strip() + "\n"
    return "def match(p, ctx):\n" + textwrap.indent(textwrap.dedent(body).strip(), "    ") + "\n"


def horizon(body: str, profile: Any = None, as_of: date = AS_OF, tz: str = "Europe/Moscow") -> Any:
    """(answer, horizon) of one rule, through RuleSet(horizons=True); checks the
    answer is plain evaluation's and the horizon holds over the days before it."""
    spec = RuleSpec("r", 1, _source(body))
    tracked = RuleSet([spec], budget_ms=0, horizons=True)
    plain_set = RuleSet([spec], budget_ms=0)
    profile = {} if profile is None else profile
    ctx = make_context(as_of, tz)
    got = tracked.evaluate(profile, ctx)
    want = plain_set.evaluate(profile, ctx)
    assert (got.matched, got.errors, got.timeouts) == (want.matched, want.errors, want.timeouts)
    assert got.horizons is not None
    h = got.horizons["r"]
    end = h if h is not None else as_of + timedelta(days=800)
    for d in _samples(as_of, end, random.Random(7)):
        later = plain_set.evaluate(profile, make_context(d, tz))
        assert ("r" in later.matched, "r" in later.errors) == (
            "r" in want.matched,
            "r" in want.errors,
        ), f"answer changed on {d}, before the horizon {h}"
    return "r" in got.matched, h


def _samples(start: date, end: date, rng: random.Random, n: int = 6) -> set[date]:
    span = (end - start).days
    if span <= 1:
        return set()
    out = {start + DAY, end - DAY}
    out |= {start + timedelta(days=rng.randint(1, span - 1)) for _ in range(n)}
    return out


def x_in(days: int) -> dict[str, str]:
    return {"x": (AS_OF + timedelta(days=days)).isoformat()}


# -- linear values ---------------------------------------------------------------------


def test_days_until_threshold_is_exact() -> None:
    # Given a date 100 days away and a rule for "within 30 days"
    # When it is evaluated tracked / Then it sleeps exactly until 30 days before it
    assert horizon("return days_until(get(p, 'x'), ctx) <= 30", x_in(100)) == (
        False,
        AS_OF + timedelta(days=70),
    )


def test_a_window_flips_on_entry_and_exit() -> None:
    body = "left = days_until(get(p, 'x'), ctx)\nreturn left is not None and 0 <= left <= 30"
    assert horizon(body, x_in(100)) == (False, AS_OF + timedelta(days=70))
    assert horizon(body, x_in(10)) == (True, AS_OF + timedelta(days=11))  # past the date
    assert horizon(body, x_in(-5)) == (False, None)  # expired: it stays expired
    assert horizon(body, {"x": "not a date"}) == (False, None)


def test_days_since_and_equality_reminders() -> None:
    assert horizon("return days_since(get(p, 'x'), ctx) == 365", x_in(-300)) == (
        False,
        AS_OF + timedelta(days=65),
    )
    assert horizon("return days_since(get(p, 'x'), ctx) == 365", x_in(-365)) == (True, AS_OF + DAY)
    assert horizon("return days_since(get(p, 'x'), ctx) > 365", x_in(-400)) == (True, None)


def test_tracked_arithmetic_stays_exact() -> None:
    # through a variable used in arithmetic: the tracked int, not the fused fast path
    body = "left = days_until(get(p, 'x'), ctx)\nreturn left * 2 + 1 <= 61"
    assert horizon(body, x_in(100)) == (False, AS_OF + timedelta(days=70))
    assert horizon("return -days_since(get(p, 'x'), ctx) > -10", x_in(-3)) == (
        True,
        AS_OF + timedelta(days=7),
    )
    assert horizon("return days_until(get(p, 'x'), ctx) - 5 >= 0", x_in(9)) == (
        True,
        AS_OF + timedelta(days=5),
    )


def test_dates_and_timedeltas() -> None:
    assert horizon("return ctx.today >= date(get(p, 'x'))", x_in(12)) == (
        False,
        AS_OF + timedelta(days=12),
    )
    assert horizon("return add_days(ctx.today, 30) > date(get(p, 'x'))", x_in(45)) == (
        False,
        AS_OF + timedelta(days=16),
    )
    assert horizon("return (ctx.today - date(get(p, 'x'))).days >= 10", x_in(-4)) == (
        False,
        AS_OF + timedelta(days=6),
    )
    assert horizon("return ctx.today - date(get(p, 'x')) > ctx.today - ctx.today", x_in(3)) == (
        False,
        AS_OF + timedelta(days=4),
    )
    assert horizon("return ctx.today.toordinal() >= date(get(p, 'x')).toordinal()", x_in(2)) == (
        False,
        AS_OF + timedelta(days=2),
    )


def test_now_is_the_same_time_on_later_days() -> None:
    body = "return ctx.now < datetime_x"
    # a datetime can only come from ctx.now itself in a rule: build one from it
    body = "x = ctx.now.replace(year=2024, month=6, day=1, hour=12)\nreturn ctx.now < x"
    ok, h = horizon(body)
    assert ok is True and h is not None  # replace() is opaque: tomorrow
    assert h == AS_OF + DAY
    assert horizon("return ctx.now.hour == 0 and ctx.now.date() == ctx.today") == (True, None)


# -- steps ------------------------------------------------------------------------------


def test_weekday_sleeps_until_saturday() -> None:
    assert horizon("return weekday(ctx.today) == 5", as_of=date(2024, 5, 6)) == (
        False,
        date(2024, 5, 11),
    )
    assert horizon("return weekday(ctx.today) == 5", as_of=date(2024, 5, 11)) == (
        True,
        date(2024, 5, 12),
    )
    assert horizon("return ctx.today.isoweekday() in (6, 7)", as_of=date(2024, 5, 6)) == (
        False,
        date(2024, 5, 11),
    )
    assert horizon("return weekday(ctx.today) == 9") == (False, None)  # never


def test_month_year_and_day_of_month() -> None:
    assert horizon("return ctx.today.month == 11") == (False, date(2024, 11, 1))
    assert horizon("return ctx.today.month == 5") == (True, date(2024, 6, 1))
    assert horizon("return ctx.today.year >= 2026") == (False, date(2026, 1, 1))
    assert horizon("return ctx.today.year < 2030") == (True, date(2030, 1, 1))
    assert horizon("return ctx.today.day == 31") == (False, date(2024, 5, 31))
    assert horizon("return ctx.today.day == 31", as_of=date(2024, 5, 31)) == (
        True,
        date(2024, 6, 1),
    )
    assert horizon("return ctx.today.day == 32") == (False, None)
    assert horizon("return ctx.today.day > 29", as_of=date(2024, 2, 1)) == (
        False,
        date(2024, 3, 30),
    )
    # month ends: the last day of February, leap and common years
    body = "return add_days(ctx.today, 1).month != ctx.today.month"
    assert horizon(body, as_of=date(2023, 2, 1))[1] == date(2023, 2, 2)  # add_days: opaque day
    assert horizon("return (ctx.today.month - 1) // 3 == 3") == (False, date(2024, 10, 1))


def test_age_steps_on_birthdays() -> None:
    birth = {"b": "2006-08-20"}
    assert horizon("return age(get(p, 'b'), ctx) >= 18", birth) == (False, date(2024, 8, 20))
    assert horizon(
        "years = age(get(p, 'b'), ctx)\nreturn years is not None and years >= 70", birth
    ) == (
        False,
        date(2076, 8, 20),
    )
    assert horizon("return between(age(get(p, 'b'), ctx), 16, 21)", birth) == (
        True,
        date(2028, 8, 20),
    )
    # a birth date in the future: no age until the day of birth
    assert horizon("return age(get(p, 'b'), ctx) is None", {"b": "2024-06-01"}) == (
        True,
        date(2024, 6, 1),
    )
    # used in arithmetic: the age's own next change, the next birthday
    assert horizon("return (age(get(p, 'b'), ctx) + 1) % 10 == 9", birth)[1] == date(2024, 8, 20)


def test_29_february_birthdays() -> None:
    leap = {"b": "2000-02-29"}
    body = "return is_birthday(get(p, 'b'), ctx)"
    assert horizon(body, leap) == (False, date(2025, 2, 28))  # common year: 28 February
    assert horizon(body, leap, as_of=date(2024, 2, 28)) == (False, date(2024, 2, 29))
    assert horizon(body, leap, as_of=date(2024, 2, 29)) == (True, date(2024, 3, 1))
    assert horizon(body, leap, as_of=date(2023, 2, 28)) == (True, date(2023, 3, 1))
    assert horizon("return age(get(p, 'b'), ctx) >= 25", leap) == (False, date(2025, 2, 28))
    assert horizon("return age(get(p, 'b'), ctx) >= 28", leap) == (False, date(2028, 2, 29))
    # the day of birth itself is not a birthday
    assert horizon(body, {"b": "2024-05-10"}) == (False, date(2025, 5, 10))


def test_dst_does_not_move_day_horizons() -> None:
    # Europe/Berlin moves its clocks on 31 March 2024: days are days
    body = "return days_until(get(p, 'x'), ctx) <= 3"
    p = {"x": "2024-04-02"}
    assert horizon(body, p, as_of=date(2024, 3, 25), tz="Europe/Berlin") == (
        False,
        date(2024, 3, 30),
    )
    assert horizon(
        "return ctx.now.date() >= date(get(p, 'x'))", p, date(2024, 3, 25), "Europe/Berlin"
    ) == (
        False,
        date(2024, 4, 2),
    )


# -- what records tomorrow ---------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        "return str(ctx.today) == '2024'",
        "return f'{days_until(get(p, \"x\"), ctx)}' == '1'",
        "return f'{ctx.today:%d.%m}' == '01.01'",
        "return ctx.today.isoformat() == '2024-01-01'",
        "return ctx.today.strftime('%A') == 'Monday'",
        "return '%d' % days_until(get(p, 'x'), ctx) == '1'",
        "return str(ctx).count('x') > 99",
        "return {ctx.today: 1}.get(0) == 1",
        "return days_until(get(p, 'x'), ctx) in {1, 2, 3, 3.5}",
        "return range(days_until(get(p, 'x'), ctx))[0] == 7",
        "return [1, 2, 3][days_until(get(p, 'x'), ctx) % 3] == 7",
        "return max(days_until(get(p, 'x'), ctx), 0) == 7",
        "return sorted([days_until(get(p, 'x'), ctx), 1.5])[0] == 7",
        "x = days_until(get(p, 'x'), ctx)\nreturn x is 7",
        "return int(days_until(get(p, 'x'), ctx)) == 7",
        "return ctx.today.replace(day=1) == date('2020-01-01')",
        "return ctx.now.timestamp() < 0",
        "return days_until(get(p, 'x'), ctx).bit_length() > 60",
    ],
)
def test_uses_it_cannot_follow_record_tomorrow(body: str) -> None:
    ok, h = horizon(body, x_in(40))
    assert ok is False and h == AS_OF + DAY


def test_operands_c_reads_without_a_method_are_still_recorded() -> None:
    # a float or bool on the left reads an int subclass in C: the policy guards them
    assert horizon("return 1.5 < days_until(get(p, 'x'), ctx)", x_in(40)) == (
        True,
        AS_OF + timedelta(days=39),
    )
    assert horizon("return 0.5 * days_until(get(p, 'x'), ctx) > 10", x_in(40)) == (
        True,
        AS_OF + DAY,
    )
    assert horizon("return True + days_until(get(p, 'x'), ctx) > 10", x_in(40)) == (
        True,
        AS_OF + timedelta(days=31),
    )
    # membership in constant ints: each one a threshold
    assert horizon("return days_until(get(p, 'x'), ctx) in {1, 2, 3}", x_in(40)) == (
        False,
        AS_OF + timedelta(days=37),
    )
    assert horizon("return days_until(get(p, 'x'), ctx) in [1, 2.0]", x_in(40)) == (
        False,
        AS_OF + DAY,
    )
    body = "lst = [days_until(get(p, 'x'), ctx), 1.5]\nlst.sort()\nreturn lst[0] == 1.5"
    assert horizon(body, x_in(40)) == (True, AS_OF + DAY)


def test_errors_and_timeouts_get_tomorrow_and_the_plain_text() -> None:
    spec = RuleSpec("boom", 1, _source("x = days_until(get(p, 'x'), ctx)\nraise ValueError(x)"))
    loop = RuleSpec("loop", 1, _source("while days_until(get(p, 'x'), ctx) > 0:\n    pass"))
    tracked = RuleSet([spec, loop], budget_ms=30, horizons=True)
    out = tracked.evaluate(x_in(3), make_context(AS_OF))
    assert out.errors == {"boom": "ValueError: 3"}
    assert out.timeouts == ["loop"]
    assert out.horizons is not None
    assert dict(out.horizons) == {"boom": AS_OF + DAY, "loop": AS_OF + DAY}


def test_a_rule_that_cannot_be_tracked_runs_untracked_with_tomorrow() -> None:
    body = "x = days_until(get(p, 'x'), ctx)\nreturn 1.5 < x < (y := 50) and y > 1"
    assert horizon(body, x_in(10)) == (True, AS_OF + DAY)


# -- the API ------------------------------------------------------------------------------


def test_outcome_carries_a_horizon_for_every_rule() -> None:
    specs = [
        RuleSpec("soon", 1, _source("return days_until(get(p, 'x'), ctx) <= 30")),
        RuleSpec("static", 1, _source("return get(p, 'x') is not None")),
    ]
    out = RuleSet(specs, horizons=True).evaluate(x_in(100), make_context(AS_OF))
    assert out.horizons is not None and out.horizons == {
        "soon": AS_OF + timedelta(days=70),
        "static": None,
    }  # a read-only mapping
    assert dict(out.horizons) == {"soon": AS_OF + timedelta(days=70), "static": None}
    assert out.horizon == AS_OF + timedelta(days=70)
    # untracked sets: no horizons, and Outcome compares as before
    plain_out = RuleSet(specs).evaluate(x_in(100), make_context(AS_OF))
    assert plain_out.horizons is None and plain_out.horizon is None
    assert plain_out == out == Outcome(["static"], {}, [])


def test_tracked_compilation_behaves_like_plain_with_a_plain_context() -> None:
    src = _source(
        "left = days_until(get(p, 'x'), ctx)\nreturn left is not None and 0 <= left <= 30"
    )
    rule = compile_rule(src, tracked=True)
    assert rule.match(x_in(10), make_context(AS_OF)) is True
    assert evaluate_tracked(rule.raw, x_in(10), make_context(AS_OF)) == (
        True,
        AS_OF + timedelta(days=11),
    )


def test_tracked_values_look_like_plain_ones() -> None:
    ctx = track_context(make_context(AS_OF))
    assert is_tracked(ctx.today) and isinstance(ctx.today, date) and ctx.today == AS_OF
    assert isinstance(ctx.now, datetime) and plain(ctx.today) is not ctx.today
    assert repr(ctx.today) == repr(AS_OF) and str(ctx.now) == str(make_context(AS_OF).now)
    assert type(ctx.today).__name__ == "datetime.date"
    assert hash(ctx.today) == hash(AS_OF)


# -- properties ------------------------------------------------------------------------------

CTX_RULES = {
    f"ctx-{i}": _source(body)
    for i, body in enumerate(
        [
            "return ctx.today.year >= 2025",
            "return ctx.today.month in (11, 12)",
            "return ctx.today.day == 1 or ctx.today.day > 28",
            "return ctx.today.toordinal() % 7 == 3",
            "try:\n    return (ctx.today - date(get(p, 'x'))).days >= 10\nexcept TypeError:\n"
            "    return False",
            "try:\n    return ctx.today >= date(get(p, 'x'))\nexcept TypeError:\n    return False",
            "return add_days(ctx.today, 30) == date(get(p, 'x'))",
            "return ctx.today.isoformat() > str(get(p, 'x', ''))",
            "return f'{ctx.today:%m}' == '05'",
            "return ctx.today.weekday() in (5, 6)",
            "return (ctx.today.month - 1) // 3 == 3",
            "d = days_until(get(p, 'x'), ctx)\nreturn d is not None and d * 2 + 1 <= 61",
            "d = days_until(get(p, 'x'), ctx)\nreturn d is not None and abs(d) <= 3",
            "d = days_since(get(p, 'x'), ctx)\nreturn d is not None and d % 7 == 0",
            "d = days_until(get(p, 'x'), ctx)\nreturn d is not None and 1.5 < d < 10.5",
            "y = age(get(p, 'birth_date'), ctx)\nreturn y is not None and y // 10 == 3",
            "try:\n    return ctx.today.toordinal() - date(get(p, 'x')).toordinal() > 30\n"
            "except AttributeError:\n    return False",
            "return ctx.today.timetuple().tm_yday > 300",
            "return month(add_months(ctx.today, 1)) == 6",
            "return ctx.now.date() > ctx.today",
        ]
    )
}
SPECS = [RuleSpec(r["key"], 1, r["source"], r["priority"], r["group"]) for r in RULES50] + [
    RuleSpec(k, 1, v) for k, v in CTX_RULES.items()
]
assert {r["key"] for r in BUILTIN_RULES} <= {s.key for s in SPECS}  # the pack is in RULES50
_PLAIN = RuleSet(SPECS, budget_ms=0)
_TRACKED = RuleSet(SPECS, budget_ms=0, horizons=True)


def _answers(out: Outcome) -> dict[str, tuple[bool, bool]]:
    return {k: (k in out.matched, k in out.errors) for k in _PLAIN.keys}


def _check_property(profile: dict[str, Any], as_of: date, tz: str, rng: random.Random) -> None:
    ctx = make_context(as_of, tz)
    got, want = _TRACKED.evaluate(profile, ctx), _PLAIN.evaluate(profile, ctx)
    assert (got.matched, got.errors, got.timeouts) == (want.matched, want.errors, want.timeouts)
    hz = got.horizons
    assert hz is not None and set(hz) == set(_PLAIN.keys)
    today = _answers(want)
    ends = {h if h is not None else as_of + timedelta(days=3 * 365) for h in hz.values()}
    days: set[date] = set()
    for end in ends:
        days |= _samples(as_of, end, rng, 5)
    for d in sorted(days):
        later = _answers(_PLAIN.evaluate(profile, make_context(d, tz)))
        for key, h in hz.items():
            if h is None or d < h:
                assert later[key] == today[key], (key, as_of, d, h, profile)


_day = st.integers(-730, 730).map(lambda n: (AS_OF + timedelta(days=n)).isoformat())
_birth = st.one_of(
    st.dates(date(1930, 1, 1), date(2026, 12, 31)).map(date.isoformat),
    st.sampled_from(["2000-02-29", "1996-02-29", "2004-02-29", "1990-02-28", "1992-03-01"]),
)
_profiles = st.fixed_dictionaries(
    {
        "birth_date": _birth,
        "x": _day,
        "driver_license": st.fixed_dictionaries(
            {
                "expires_on": _day,
                "renewed_on": st.one_of(st.none(), _day),
                "number": st.just("77 1"),
            }
        ),
        "passport": st.fixed_dictionaries({"issued_on": _day}),
        "vehicle": st.fixed_dictionaries(
            {
                "plate": st.just("A123BC 77"),
                "registration_expires_on": _day,
                "insurance": st.fixed_dictionaries({"expires_on": _day}),
            }
        ),
        "orders": st.fixed_dictionaries({"total": st.integers(0, 40), "last_at": _day}),
        "region": st.sampled_from([77, 16, 50, 89]),
        "language": st.sampled_from(["ru", "en"]),
        "user_id": st.integers(1, 10**6),
    }
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    profile=_profiles,
    shift=st.integers(-400, 400),
    tz=st.sampled_from(["Europe/Moscow", "Europe/Berlin"]),
    seed=st.integers(0, 2**16),
)
def test_no_rule_changes_its_answer_before_its_horizon(
    profile: dict[str, Any], shift: int, tz: str, seed: int
) -> None:
    # Given a random profile (dates within two years of today, 29 February births) and
    # the pack, the 50 bench rules and rules reading ctx.today directly
    # When evaluated tracked / Then the answers are plain evaluation's, and on any
    # sampled date before a rule's horizon (and the day before it) its answer is the same
    _check_property(profile, AS_OF + timedelta(days=shift), tz, random.Random(seed))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32))
def test_no_rule_changes_its_answer_before_its_horizon_on_odd_profiles(seed: int) -> None:
    # the rules tests' generator: realistic users with missing, None and malformed values
    rng = random.Random(seed)
    as_of = AS_OF + timedelta(days=rng.randint(-400, 400))
    _check_property(random_profile(rng, as_of), as_of, "Europe/Moscow", rng)


def test_horizons_of_the_bench_rules_are_not_absurdly_early() -> None:
    # Given realistic users / Then most (user, rule) pairs sleep for more than a week,
    # and a licence that expires in 100 days wakes the expiring rule 30 days before
    rng = random.Random(3)
    long = total = 0
    for uid in range(300):
        out = _TRACKED.evaluate(random_profile(rng, AS_OF, uid), make_context(AS_OF))
        assert out.horizons is not None
        for h in out.horizons.values():
            total += 1
            long += h is None or h > AS_OF + timedelta(days=7)
    assert long / total > 0.8
    out = _TRACKED.evaluate(
        {"driver_license": {"expires_on": (AS_OF + timedelta(days=100)).isoformat()}},
        make_context(AS_OF),
    )
    assert out.horizons is not None
    assert out.horizons["dl-expiring"] == AS_OF + timedelta(days=70)
    assert out.horizons["dl-expiring-90d"] == AS_OF + timedelta(days=10)
    assert out.horizons["dl-reminder-60"] == AS_OF + timedelta(days=40)


def test_the_scan_cap_is_recorded_for_unbounded_periodic_uses() -> None:
    # a non-monotone step with no known period: scanned up to CAP days, then the cap
    body = "y = age(get(p, 'b'), ctx)\nreturn (y * y) % 7 == 3"
    ok, h = horizon(body, {"b": "2000-06-01"})
    assert h is not None and h <= AS_OF + timedelta(days=CAP)


def test_threads_sharing_a_rule_set_record_their_own_horizons() -> None:
    # Given one tracked rule set evaluated from two threads at once
    import threading

    rng = random.Random(11)
    profiles = [random_profile(rng, AS_OF, uid) for uid in range(200)]
    ctx = make_context(AS_OF)
    want = [dict(_TRACKED.evaluate(p, ctx).horizons or {}) for p in profiles]
    got: dict[int, list[dict[str, Any]]] = {}

    def work(n: int) -> None:
        got[n] = [dict(_TRACKED.evaluate(p, ctx).horizons or {}) for p in profiles]

    # When they run / Then each sees the horizons a single thread sees
    threads = [threading.Thread(target=work, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[0] == want and got[1] == want


def test_names_shadowing_module_constants_or_helpers_are_not_trusted() -> None:
    # a local list shadows the module's constant ints: membership is not a threshold
    src = (
        "LIMITS = (1, 2)\n\ndef match(p, ctx):\n    LIMITS = [10.0]\n"
        "    left = days_until(get(p, 'x'), ctx)\n    return left in LIMITS\n"
    )
    assert horizon(src, x_in(40)) == (False, AS_OF + DAY)
    # a local function named like a helper: not the helper (a value called: tomorrow)
    body = (
        "between = lambda a, lo, hi: a <= 30\n"
        "left = days_until(get(p, 'x'), ctx)\nreturn between(left, 0, 1000)"
    )
    assert horizon(body, x_in(40)) == (False, AS_OF + DAY)
    # a nested def is instrumented code: exact
    body = (
        "left = days_until(get(p, 'x'), ctx)\n"
        "def between(a, lo, hi):\n    return a <= 30\nreturn between(left, 0, 1000)"
    )
    assert horizon(body, x_in(40)) == (False, AS_OF + timedelta(days=10))


def test_rules_that_never_read_ctx_never_wake_unless_they_fail() -> None:
    specs = [
        RuleSpec("static", 1, _source("return get(p, 'x') is not None")),
        RuleSpec("broken", 1, _source("return p['missing']")),
        RuleSpec("helper", 1, _source("x = p\ndef f(q):\n    return q\nreturn f(x) is p")),
    ]
    out = RuleSet(specs, horizons=True).evaluate(x_in(3), make_context(AS_OF))
    assert out.errors == {"broken": "KeyError: 'missing'"}
    assert out.horizons is not None
    assert dict(out.horizons) == {"static": None, "broken": AS_OF + DAY, "helper": None}


# -- and / or tested for truth: the operands that decide ---------------------------------

MONDAY, SATURDAY = date(2024, 5, 6), date(2024, 5, 11)
WEEKEND_77 = 'return weekday(ctx.today) == 5 and get(p, "region") == 77'


def test_a_date_first_and_sleeps_on_the_profile_operand_that_decides() -> None:
    # Given the date tested first, then the profile
    # Then a profile outside region 77 never wakes (Monday and Saturday alike), one in
    # it wakes on Saturday and again on Sunday
    assert horizon(WEEKEND_77, {"region": 16}, as_of=MONDAY) == (False, None)
    assert horizon(WEEKEND_77, {"region": 16}, as_of=SATURDAY) == (False, None)
    assert horizon(WEEKEND_77, {"region": 77}, as_of=MONDAY) == (False, SATURDAY)
    assert horizon(WEEKEND_77, {"region": 77}, as_of=SATURDAY) == (True, SATURDAY + DAY)
    # the latest of the deciding operands counts: both dates false, the later one holds
    both = "return ctx.today.month == 11 and is_birthday(get(p, 'b'), ctx)"
    assert horizon(both, {"b": "1990-11-20"}) == (False, date(2024, 11, 20))
    # or: the true operands decide
    either = "return ctx.today.month == 11 or has(p, 'vehicle.plate')"
    assert horizon(either, {"vehicle": {"plate": "A1"}}) == (True, None)
    assert horizon(either, {}) == (False, date(2024, 11, 1))


@pytest.mark.parametrize(
    "body",
    [
        f"if {WEEKEND_77[7:]}:\n    return True\nreturn False",
        f"return not ({WEEKEND_77[7:]})",
        f"return [1 for i in (1,) if {WEEKEND_77[7:]}] == []",
        f"return 1 if ({WEEKEND_77[7:]}) else 0",
        f"while {WEEKEND_77[7:]}:\n    return True\nreturn False",
    ],
)
def test_every_truth_test_speculates(body: str) -> None:
    got = horizon(body, {"region": 16}, as_of=MONDAY)
    assert got[1] is None, body


@pytest.mark.parametrize(
    "body",
    [
        # the value itself is used, not only its truth
        f"x = {WEEKEND_77[7:]}\nreturn x",
        f"return ({WEEKEND_77[7:]}) == 1",
        # a later operand with a side effect or a loop is never run ahead of need
        # (nor any operand after it: it may depend on the effect)
        "seen = []\nreturn weekday(ctx.today) == 5 and seen.append(1) is None and len(seen) == 9",
        'return weekday(ctx.today) == 5 and any(x == 77 for x in [get(p, "region")])',
        'def r(q):\n    return get(q, "region") == 77\n\n'
        'def match(p, ctx):\n    return weekday(ctx.today) == 5 and r(p)',
        # an assignment expression would bind inside the thunk: left alone
        'return weekday(ctx.today) == 5 and (y := get(p, "region")) == 77',
    ],
)
def test_values_and_impure_operands_keep_the_first_deciding_operand(body: str) -> None:
    assert horizon(body, {"region": 16}, as_of=MONDAY) == (False, SATURDAY), body


def test_a_speculated_operand_that_raises_decides_nothing() -> None:
    # Given a later operand that raises on this profile (a missing key)
    body = 'return weekday(ctx.today) == 5 and p["region"] == 77'
    # Then the answer is plain evaluation's and the date operand's horizon stays
    assert horizon(body, {}, as_of=MONDAY) == (False, SATURDAY)
    # and on Saturday the rule raises, as it does untracked
    out = RuleSet([RuleSpec("r", 1, _source(body))], horizons=True).evaluate(
        {}, make_context(SATURDAY)
    )
    assert out.errors == {"r": "KeyError: 'region'"} and out.horizons is not None
    assert out.horizons["r"] == SATURDAY + DAY


def test_speculation_runs_later_operands_in_order_and_only_the_pure_ones() -> None:
    # Given operands that are pure but time-dependent themselves
    body = (
        "return (weekday(ctx.today) == 5 and days_until(get(p, 'x'), ctx) <= 30"
        " and get(p, 'region') == 77)"
    )
    # Then the latest deciding operand wins: the licence window opens 30 days before x
    opens = AS_OF + timedelta(days=40 - 30)
    assert horizon(body, {**x_in(40), "region": 77}, as_of=MONDAY) == (False, opens)
    assert horizon(body, {**x_in(40), "region": 16}, as_of=MONDAY) == (False, None)


def test_speculation_never_runs_what_could_spend_the_budget() -> None:
    # Given later operands that loop or build huge values (not pure, or refused by the
    # size guards when run ahead of need)
    body = (
        "return (weekday(ctx.today) == 5 and get(p, 'region') == 77"
        " and max(range(10**9)) > 0 and len(str(10 ** (10**7))) > 0)"
    )
    rules = RuleSet([RuleSpec("r", 1, _source(body))], budget_ms=50, horizons=True)
    # When evaluated on a Monday / Then it answers in budget, untouched by them
    out = rules.evaluate({"region": 77}, make_context(MONDAY))
    assert not out.timeouts and not out.errors and out.horizons is not None
    assert out.horizons["r"] == SATURDAY
