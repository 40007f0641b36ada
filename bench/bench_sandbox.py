"""Cost of the rule sandbox and of the time budget against plain Python.

    .venv/bin/python bench/bench_sandbox.py [--profiles 20000] [--repeat 5]

Evaluates 20 realistic rules (the built-in pack + 14 analyst-style rules) over
synthetic profiles (kvadrupel.synthetic) and prints, per rule call:

* plain      - the same sources exec'd as ordinary functions, called in a loop
               with a try/except each (what an unsandboxed evaluator would do);
* sandboxed  - RuleSet(budget_ms=0).evaluate: RestrictedPython policy + guards,
               all rules in one generated function, no time budget;
* budget     - RuleSet(budget_ms=50).evaluate: the same plus the watchdog;
* stock RP   - (reference) RestrictedPython's default policy and guards
               (safer_getattr, _getitem_, _getiter_, full_write_guard).

Then the alternatives measured for two design choices: the date-parse cache and
the read-only profile. Timings are the best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import builtins
import functools
import operator
import sys
import time
from datetime import date as _date
from pathlib import Path
from types import MappingProxyType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from RestrictedPython import compile_restricted_exec, safe_builtins  # noqa: E402
from RestrictedPython.Eval import default_guarded_getitem  # noqa: E402
from RestrictedPython.Guards import (  # noqa: E402
    full_write_guard,
    guarded_iter_unpack_sequence,
    guarded_unpack_sequence,
    safer_getattr,
)

from kvadrupel.synthetic import users  # noqa: E402
from rules import helpers  # noqa: E402
from rules.context import make_context  # noqa: E402
from rules.pack import BUILTIN_RULES  # noqa: E402
from rules.ruleset import RuleSet, RuleSpec  # noqa: E402

EXTRA_RULES = {
    "active-customer": """
def match(profile, ctx):
    since = days_since(get(profile, "orders.last_at"), ctx)
    return since is not None and since <= 90 and get(profile, "orders.total", 0) >= 5
""",
    "lapsed-customer": """
def match(profile, ctx):
    since = days_since(get(profile, "orders.last_at"), ctx)
    return get(profile, "orders.total", 0) > 0 and since is not None and since > 365
""",
    "young-driver": """
def match(profile, ctx):
    years = age(get(profile, "birth_date"), ctx)
    return between(years, 18, 21) and has(profile, "driver_license.number")
""",
    "senior-ru": """
def match(profile, ctx):
    years = age(profile.get("birth_date"), ctx)
    return years is not None and years >= 65 and profile.get("language") == "ru"
""",
    "moscow-region": """
REGIONS = (77, 50, 97, 99, 177, 197, 199, 777)
def match(profile, ctx):
    return profile.get("region") in REGIONS
""",
    "birthday-month": """
def match(profile, ctx):
    return month(get(profile, "birth_date")) == ctx.today.month
""",
    "weekend-buyer": """
def match(profile, ctx):
    return weekday(ctx.today) >= 5 and get(profile, "orders.total", 0) >= 1
""",
    "ab-bucket-3": """
def match(profile, ctx):
    uid = get(profile, "user_id")
    return isinstance(uid, int) and uid % 10 == 3
""",
    "example-org-mail": """
def match(profile, ctx):
    email = get(profile, "email")
    return isinstance(email, str) and email.lower().endswith("@example.org") and len(email) > 20
""",
    "plate-77": """
def match(profile, ctx):
    plate = get(profile, "vehicle.plate")
    if not plate:
        return False
    parts = plate.split(" ")
    return len(parts) == 2 and parts[1] in ("77", "97", "99", "177", "197", "199", "777")
""",
    "licence-and-car-soon": """
def match(profile, ctx):
    dl = days_until(get(profile, "driver_license.expires_on"), ctx)
    car = days_until(get(profile, "vehicle.registration_expires_on"), ctx)
    return dl is not None and car is not None and 0 <= dl <= 60 and 0 <= car <= 60
""",
    "licence-no-car": """
def match(profile, ctx):
    return has(profile, "driver_license.number") and not has(profile, "vehicle")
""",
    "old-passport": """
def match(profile, ctx):
    since = days_since(get(profile, "passport.issued_on"), ctx)
    return since is not None and since > 365 * 19
""",
    "incomplete-profile": """
def match(profile, ctx):
    missing = 0
    for key in ("email", "birth_date", "passport", "driver_license", "vehicle"):
        if profile.get(key) is None:
            missing += 1
    try:
        spend = profile["orders"]["total"] * 1500
    except (KeyError, TypeError):
        spend = 0
    return missing >= 1 and spend > 30000
""",
}


def all_specs() -> list[RuleSpec]:
    specs = [RuleSpec(r["key"], 1, r["source"], r["priority"], r["group"]) for r in BUILTIN_RULES]
    specs += [RuleSpec(k, 1, src) for k, src in EXTRA_RULES.items()]
    return specs


def plain_functions(specs: list[RuleSpec]) -> list[tuple[str, object]]:
    out = []
    for s in sorted(specs, key=lambda s: (-s.priority, s.key)):
        ns = {"__builtins__": builtins, **helpers.HELPERS}
        exec(compile(s.source, f"<plain:{s.key}>", "exec"), ns)  # noqa: S102
        out.append((s.key, ns["match"]))
    return out


def stock_rp_functions(specs: list[RuleSpec]) -> list[tuple[str, object]]:
    out = []
    for s in sorted(specs, key=lambda s: (-s.priority, s.key)):
        result = compile_restricted_exec(s.source, f"<rp:{s.key}>")
        assert not result.errors, result.errors
        ns = {
            "__builtins__": {
                **safe_builtins,
                "isinstance": isinstance,
                "len": len,
                "any": any,
                "all": all,
                "sum": sum,
                "min": min,
                "max": max,
            },
            **helpers.HELPERS,
            "_getattr_": safer_getattr,
            "_getitem_": default_guarded_getitem,
            "_getiter_": iter,
            "_write_": full_write_guard,
            "_unpack_sequence_": guarded_unpack_sequence,
            "_iter_unpack_sequence_": guarded_iter_unpack_sequence,
            "_inplacevar_": lambda op, x, y: {"+=": operator.add}[op](x, y),
        }
        exec(result.code, ns)  # noqa: S102
        out.append((s.key, ns["match"]))
    return out


def loop_evaluator(fns: list[tuple[str, object]]):
    def evaluate(profile, ctx):
        matched, errors = [], {}
        for key, fn in fns:
            try:
                if fn(profile, ctx):
                    matched.append(key)
            except Exception as exc:
                errors[key] = f"{type(exc).__name__}: {exc}"
        return matched, errors

    return evaluate


def interleaved(repeat: int, variants: dict) -> dict[str, float]:
    """Best time of each zero-argument callable, the variants taking turns so that
    load from other processes on the machine hits all of them alike."""
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(repeat):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def run_all(evaluate, profiles, ctx) -> None:
    for p in profiles:
        evaluate(p, ctx)


def run_batched(ruleset: RuleSet, profiles, ctx, batch: int = 256) -> None:
    """As the nightly evaluator runs: batches of 256 profiles, each with the per-batch
    budget open (the watchdog charges every rule's CPU; engine/evaluate/evaluation.py)."""
    evaluate = ruleset.evaluate
    for i in range(0, len(profiles), batch):
        slot = ruleset.open_batch(1000)
        try:
            for p in profiles[i:i + batch]:
                evaluate(p, ctx)
        finally:
            ruleset.close_batch(slot)


def stop_latency(budget_ms: float, busy_threads: int, tries: int = 5) -> tuple[float, float]:
    """Median (wall ms, CPU ms) from the start of an endless rule to its interrupt,
    with ``busy_threads`` pure-Python threads of this process competing for the GIL
    (the CPU-time budget only counts the rule's own CPU)."""
    import statistics
    import threading

    rules = RuleSet([RuleSpec("loop", 1, "def match(p, ctx):\n    while True:\n        pass\n")],
                    budget_ms=budget_ms)
    stop = threading.Event()

    def burn() -> None:
        while not stop.is_set():
            pass

    threads = [threading.Thread(target=burn, daemon=True) for _ in range(busy_threads)]
    for t in threads:
        t.start()
    walls, cpus = [], []
    try:
        for _ in range(tries):
            w0, c0 = time.perf_counter(), time.thread_time()
            out = rules.evaluate({}, make_context(_date(2024, 5, 10)))
            walls.append((time.perf_counter() - w0) * 1000)
            cpus.append((time.thread_time() - c0) * 1000)
            assert out.timeouts == ["loop"], out
    finally:
        stop.set()
        for t in threads:
            t.join()
    return statistics.median(walls), statistics.median(cpus)


# -- alternatives for the design choices --------------------------------------


def date_nocache(x):
    if type(x) is str:
        return helpers._parse_date(x) if len(x) <= 40 else None
    return helpers.date(x)


@functools.lru_cache(maxsize=1 << 16)
def _lru_parse(x):
    return helpers._parse_date(x)


def date_lru(x):
    if type(x) is str:
        return _lru_parse(x) if len(x) <= 40 else None
    return helpers.date(x)


READS_PER_DATE = 3  # several rules read the same date of a profile


def bench_dates(profiles, repeat: int) -> dict[str, float]:
    """ns per date read: each profile's 4 dates read READS_PER_DATE times each."""
    per_profile = [
        [
            p["birth_date"],
            p["driver_license"]["expires_on"],
            p["passport"]["issued_on"],
            p["orders"]["last_at"],
        ]
        * READS_PER_DATE
        for p in profiles
    ]
    reads = sum(len(x) for x in per_profile)
    cache: dict = {}

    def each(fn):
        return lambda: [fn(s) for strings in per_profile for s in strings]

    def with_profile_dict():  # a dict cleared for each profile
        for strings in per_profile:
            cache.clear()
            for s in strings:
                d = cache.get(s)
                if d is None:
                    d = cache[s] = date_nocache(s)

    variants = {
        "no cache": each(date_nocache),
        "module dict (chosen)": each(helpers.date),
        "functools.lru_cache": each(date_lru),
        "per-profile dict": with_profile_dict,
    }
    return {k: v / reads for k, v in interleaved(repeat, variants).items()}


def deep_freeze(x):
    if isinstance(x, dict):
        return MappingProxyType({k: deep_freeze(v) for k, v in x.items()})
    if isinstance(x, list):
        return tuple(deep_freeze(v) for v in x)
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profiles", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    as_of = _date(2024, 5, 10)
    profiles = [doc for _, doc in users(args.profiles, as_of)]
    ctx = make_context(as_of)
    specs = all_specs()
    n_rules = len(specs)
    calls = len(profiles) * n_rules

    plain = loop_evaluator(plain_functions(specs))
    stock = loop_evaluator(stock_rp_functions(specs))
    sandboxed = RuleSet(specs, budget_ms=0).evaluate
    budgeted_set = RuleSet(specs, budget_ms=50)
    budgeted = budgeted_set.evaluate

    # The variants must agree before their speed means anything.
    for p in profiles[:2000]:
        expect = plain(p, ctx)
        for got in (sandboxed(p, ctx), budgeted(p, ctx)):
            assert (got.matched, got.errors, got.timeouts) == (expect[0], expect[1], []), (
                p,
                got,
                expect,
            )

    print(
        f"{n_rules} rules x {len(profiles):,} profiles = {calls:,} rule calls; "
        f"best of {args.repeat}; Python {sys.version.split()[0]}"
    )
    evaluators = {
        "plain": plain,
        "sandboxed": sandboxed,
        "sandboxed+budget": budgeted,
        "stock RestrictedPython": stock,
    }
    variants = {name: (lambda fn=fn: run_all(fn, profiles, ctx)) for name, fn in evaluators.items()}
    variants["sandboxed+budget+batch"] = lambda: run_batched(budgeted_set, profiles, ctx)
    results = interleaved(args.repeat, variants)
    base = results["plain"]
    print(f"{'variant':<24}{'us/rule':>9}{'us/profile':>12}{'ratio':>8}")
    for name, t in results.items():
        print(f"{name:<24}{t / calls * 1e6:>9.3f}{t / len(profiles) * 1e6:>12.2f}{t / base:>8.2f}x")

    print("\nendless rule, 50 ms CPU budget: median time from start to interrupt")
    for busy in (0, 1, 3):
        wall, cpu = stop_latency(50, busy)
        print(
            f"  {busy} other busy Python thread(s): wall {wall:6.1f} ms, rule's CPU {cpu:6.1f} ms"
        )

    print(f"\ndate(x), per read (each date of a profile read {READS_PER_DATE} times):")
    for name, t in bench_dates(profiles, args.repeat).items():
        print(f"  {name:<24}{t * 1e9:>8.0f} ns")

    freeze = interleaved(args.repeat, {"f": lambda: [deep_freeze(p) for p in profiles]})["f"]
    freeze /= len(profiles)
    print("\nread-only profile, per profile:")
    print(
        f"  deep-freeze (MappingProxyType + tuples)  {freeze * 1e6:.2f} us "
        f"({freeze / (base / len(profiles)):.0%} of a plain evaluation of all rules)"
    )
    print(
        "  write guard (chosen)                       0 us unless a rule writes; then one walk "
        "of the profile per profile"
    )


if __name__ == "__main__":
    main()
