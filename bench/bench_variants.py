"""What content variants cost the evaluator per enter (docs/channels.md, "Content variants").

A rule's content is composed once per *enter* (engine/evaluate/compose.py: render the
banner/e-mail in the user's language, re-run the rule for the why-data); a rule with
variants first picks the user's variant (one SHA-256 of ``salt/variant:user``). This
times ``compose`` for the same users on the same rule without and with two variants, in
the same run, interleaved in rounds, and prints µs per enter and their ratio; and
``variant_of`` alone against one SHA-256 (its floor). Users whose state did not change
(most of a nightly run) never reach ``compose``, so they pay nothing.

    .venv/bin/python bench/bench_variants.py [--users N] [--rounds R]
"""

from __future__ import annotations

import argparse
import statistics
import time
from hashlib import sha256

from channels.variants import variant_of
from engine.evaluate.compose import compose
from rules.context import make_context
from rules.ruleset import ActiveRule

SOURCE = "def match(profile, ctx):\n    return get(profile, 'licence.expires_on') is not None\n"
BANNER = {"title": "Hello {{ profile.name }}", "body": "Renew by {{ profile.licence.expires_on }}",
          "link": "/renew", "translations": {"de": {"title": "Hallo {{ profile.name }}"}}}
EMAIL = {"subject": "Renew", "text": "Dear {{ profile.name }}, renew soon."}
VARIANTS = [{"key": "a", "weight": 50, "banner": {**BANNER, "title": "A {{ profile.name }}"}},
            {"key": "b", "weight": 50, "email": {**EMAIL, "subject": "B"}}]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    ctx = make_context("2026-11-24")
    plain = ActiveRule("r1", 1, "r1", None, 100, SOURCE, BANNER, EMAIL)
    varied = ActiveRule("r1", 1, "r1", None, 100, SOURCE, BANNER, EMAIL, VARIANTS, None)
    users = [(4_700_000_000 + i, {"name": f"N{i}", "language": "de" if i % 3 else "en",
                                  "licence": {"expires_on": "2026-12-01"}})
             for i in range(args.users)]

    def run(rule: ActiveRule) -> float:
        t0 = time.perf_counter()
        for uid, p in users:
            compose(rule, p, ctx, uid)
        return (time.perf_counter() - t0) / len(users) * 1e6

    run(plain), run(varied)  # warm up the template caches
    base, var = [], []
    for _ in range(args.rounds):
        base.append(run(plain))
        var.append(run(varied))
    b, v = statistics.median(base), statistics.median(var)
    t0 = time.perf_counter()
    for uid, _ in users:
        variant_of(uid, "r1", VARIANTS)
    pick = (time.perf_counter() - t0) / len(users) * 1e6
    t0 = time.perf_counter()
    for uid, _ in users:
        sha256(f"r1/variant:{uid}".encode()).digest()
    floor = (time.perf_counter() - t0) / len(users) * 1e6
    print(f"compose per enter, median of {args.rounds} rounds x {args.users} users:")
    print(f"  without variants  {b:8.1f} µs")
    print(f"  with 2 variants   {v:8.1f} µs   ratio {v / b:.3f}")
    print(f"variant_of alone    {pick:8.2f} µs   (one SHA-256: {floor:.2f} µs)")


if __name__ == "__main__":
    main()
