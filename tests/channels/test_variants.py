"""Content variants: the assignment (weighted, stable, independent of the holdout and the
control group) and the validation of a rule's variants."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from pydantic import ValidationError

from base.buckets import CONTROL_SALT, bucket, in_share, pick_weighted
from channels.holdouts import arm_of
from channels.variants import content_of, variant_of
from rules.models import RuleIn
from rules.ruleset import ActiveRule

BASE = 4_600_000_000
N = 100_000
BANNER = {"title": "t"}


def variants(*weights: float) -> list[dict[str, Any]]:
    return [{"key": f"v{i}", "weight": w, "banner": {"title": f"T{i}"}}
            for i, w in enumerate(weights)]


def test_the_split_follows_the_weights_over_100k_users() -> None:
    vs = variants(50, 30, 20)
    got = [0, 0, 0]
    for u in range(BASE, BASE + N):
        i = variant_of(u, "r1", vs)
        assert i is not None
        got[i] += 1
    # binomial standard deviation at 100k is ≤ 0.16 percentage points: 0.6 pp is ~4σ
    for share, want in zip((g / N for g in got), (0.5, 0.3, 0.2), strict=True):
        assert abs(share - want) < 0.006, got
    # exactly the documented pick over the buckets, for uneven weights too
    for ws in ((50, 30, 20), (1, 1), (0.3, 7, 2.2, 1e-3), (1,) * 10):
        vs_ = variants(*ws)
        for u in range(BASE, BASE + 5000):
            assert variant_of(u, "r1", vs_) == pick_weighted(bucket("r1/variant", u), ws)
    # weights need not sum to 100
    assert [variant_of(u, "r1", variants(5, 3, 2)) for u in range(BASE, BASE + 2000)] == \
        [variant_of(u, "r1", vs) for u in range(BASE, BASE + 2000)]


def test_the_variant_is_stable_across_processes_and_salted() -> None:
    vs = variants(1, 1)
    users = list(range(BASE, BASE + 300))
    here = [variant_of(u, "r1", vs) for u in users]
    code = ("from channels.variants import variant_of;"
            f"print([variant_of(u, 'r1', {vs!r}) for u in {users!r}])")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": "123"}, cwd=".")
    assert other.stdout.strip() == repr(here)
    # the documented formula, written out
    assert here == [0 if bucket("r1/variant", u) < 5000 else 1 for u in users]
    # another salt reshuffles
    assert here != [variant_of(u, "r2", vs) for u in users]


def test_the_variant_is_independent_of_the_holdout_and_the_control_group() -> None:
    vs = variants(1, 1)
    counts: dict[tuple[str, int], int] = {}
    for u in range(BASE, BASE + N):
        arm = arm_of(u, "r1", 50.0, 10.0)
        i = variant_of(u, "r1", vs)
        assert i is not None
        counts[(arm, i)] = counts.get((arm, i), 0) + 1
    # within every arm the split is still half and half (independent hashes)
    for arm in ("treatment", "holdout", "control"):
        a, b = counts[(arm, 0)], counts[(arm, 1)]
        assert abs(a / (a + b) - 0.5) < 0.015, (arm, a, b)
    # and the control group is the one hashed with its own salt
    assert counts[("control", 0)] + counts[("control", 1)] == sum(
        in_share(bucket(CONTROL_SALT, u), 10.0) for u in range(BASE, BASE + N))


def test_content_of_takes_the_variants_parts_over_the_rules() -> None:
    email = {"subject": "s", "text": "x"}
    vs = [{"key": "a", "weight": 1, "banner": {"title": "A"}},
          {"key": "b", "weight": 1, "email": {"subject": "B", "text": "y"}}]
    rule = ActiveRule("r1", 1, "r1", None, 100, "src", BANNER, email, vs, "salty")
    seen = set()
    for u in range(BASE, BASE + 200):
        banner, mail, key = content_of(rule, u)
        assert key == ["a", "b"][variant_of(u, "salty", vs) or 0]
        assert (banner, mail) == (({"title": "A"}, email) if key == "a"
                                  else (BANNER, {"subject": "B", "text": "y"}))
        seen.add(key)
    assert seen == {"a", "b"}
    plain = ActiveRule("r1", 1, "r1", None, 100, "src", BANNER, email)
    assert content_of(plain, BASE) == (BANNER, email, None)


def rule_in(vs: Any, **kw: Any) -> RuleIn:
    return RuleIn.model_validate({"key": "r1", "name": "r", "source": "x", "banner": BANNER,
                                  "variants": vs, **kw})


@pytest.mark.parametrize(("vs", "match"), [
    (variants(1), "2 to 10"),
    (variants(*[1] * 11), "at most 10"),
    ([{"key": "a", "weight": 1, "banner": BANNER}] * 2, "unique"),
    (variants(1, 0), "greater than 0"),
    (variants(1, -2), "greater than 0"),
    (variants(1, float("nan")), "finite"),
    ([{"key": "A b", "weight": 1, "banner": BANNER}, *variants(1)], "pattern"),
    ([{"key": "a", "weight": 1}, *variants(1)], "neither a banner"),
    ([{"key": "a", "weight": 1, "banner": {"title": ""}}, *variants(1)], "at least 1"),
    ([{"key": "a", "weight": 1, "banner": {"title": "t", "link": "javascript:x"}},
      *variants(1)], "scheme"),
    ([{"key": "a", "weight": 1, "email": {"subject": "s", "text": "t"}}, *variants(1)],
     "the rule has none"),
    ([{"key": "a", "weight": 1, "banner": BANNER, "extra": 1}, *variants(1)], "xtra"),
])
def test_bad_variants_are_refused_with_a_reason(vs: Any, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        rule_in(vs)


def test_good_variants_round_trip() -> None:
    r = rule_in([{"key": "a", "weight": 2.5, "banner": {"title": "A", "push": {"title": "P"},
                                                       "translations": {"de": {"title": "D"}}}},
                 {"key": "b", "weight": 1, "banner": {"title": "B"}}])
    assert r.variants is not None
    dumped = [v.model_dump() for v in r.variants]
    assert dumped == [{"key": "a", "weight": 2.5,
                       "banner": {"title": "A", "body": "", "link": "",
                                  "push": {"title": "P", "body": None, "link": None},
                                  "translations": {"de": {"title": "D", "body": None,
                                                          "link": None}}}},
                      {"key": "b", "weight": 1.0,
                       "banner": {"title": "B", "body": "", "link": ""}}]
    assert rule_in([]).variants is None and rule_in(None).variants is None
