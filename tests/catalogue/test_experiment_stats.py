"""The experiment statistics against published numbers, closed forms and seeded simulations.

Reference values are the ones printed in the papers (Newcombe 1998a and 1998b, tables of
the χ² distribution) or closed forms written here independently of the module; none was
copied from the module's own output.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from catalogue.experiment_stats import (
    Z95,
    Arm,
    analyse,
    chi2_sf,
    newcombe_diff,
    relative_uplift,
    sample_ratio_mismatch,
    users_to_detect,
    wilson,
)

# --- Wilson ---------------------------------------------------------------------------

# Newcombe (1998a) "Two-sided confidence intervals for the single proportion", Table II,
# method 3 (score interval without continuity correction), to 4 decimals.
WILSON_PUBLISHED = [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0000, 0.1611),
    (1, 29, 0.0061, 0.1718),
]


@pytest.mark.parametrize(("x", "n", "low", "high"), WILSON_PUBLISHED)
def test_wilson_matches_newcombe_1998a(x: int, n: int, low: float, high: float) -> None:
    ci = wilson(x, n)
    assert ci.low == pytest.approx(low, abs=5e-5)
    assert ci.high == pytest.approx(high, abs=5e-5)


@pytest.mark.parametrize(("x", "n"), [(3, 10), (40, 400), (999, 1000), (5, 7)])
def test_wilson_ends_are_where_the_score_test_is_exactly_z(x: int, n: int) -> None:
    """The defining property: each end π solves |p − π| = z·√(π(1 − π)/n)."""
    p = x / n
    for end in (wilson(x, n).low, wilson(x, n).high):
        assert abs(p - end) == pytest.approx(Z95 * math.sqrt(end * (1 - end) / n), rel=1e-9)


def test_wilson_edges() -> None:
    assert (wilson(0, 0).low, wilson(0, 0).high) == (0.0, 1.0)
    assert wilson(0, 50).low == 0.0 and wilson(50, 50).high == 1.0
    with pytest.raises(ValueError):
        wilson(6, 5)
    with pytest.raises(ValueError):
        wilson(-1, 5)


# --- Newcombe difference ---------------------------------------------------------------

# Newcombe (1998b) "Interval estimation for the difference between independent
# proportions: comparison of eleven methods", Table II, method 10, to 4 decimals.
NEWCOMBE_PUBLISHED = [
    ((56, 70, 48, 80), 0.2000, 0.0524, 0.3339),
    ((9, 10, 3, 10), 0.6000, 0.1705, 0.8090),
    ((5, 56, 0, 29), 0.0893, -0.0381, 0.1926),
    ((0, 10, 0, 20), 0.0000, -0.1611, 0.2775),
    ((0, 10, 0, 10), 0.0000, -0.2775, 0.2775),
    ((10, 10, 0, 20), 1.0000, 0.6791, 1.0000),
    ((10, 10, 0, 10), 1.0000, 0.6075, 1.0000),
]


@pytest.mark.parametrize(("counts", "diff", "low", "high"), NEWCOMBE_PUBLISHED)
def test_newcombe_matches_table_ii(counts: tuple[int, int, int, int], diff: float, low: float,
                                   high: float) -> None:
    est = newcombe_diff(*counts)
    assert est.value == pytest.approx(diff, abs=5e-5)
    assert est.ci.low == pytest.approx(low, abs=5e-5)
    assert est.ci.high == pytest.approx(high, abs=5e-5)


def test_newcombe_is_antisymmetric_in_the_arms() -> None:
    a, b = newcombe_diff(30, 200, 45, 210), newcombe_diff(45, 210, 30, 200)
    assert a.value == pytest.approx(-b.value)
    assert (a.ci.low, a.ci.high) == pytest.approx((-b.ci.high, -b.ci.low))


# --- relative uplift ---------------------------------------------------------------------

def test_relative_uplift_katz() -> None:
    # 120/1000 vs 100/1000: ratio 1.2; the Katz interval is symmetric on the log scale
    # with se² = 1/120 − 1/1000 + 1/100 − 1/1000.
    est = relative_uplift(120, 1000, 100, 1000)
    assert est is not None
    assert est.value == pytest.approx(0.2)
    se = math.sqrt(1 / 120 - 1 / 1000 + 1 / 100 - 1 / 1000)
    lo, hi = math.log(1 + est.ci.low), math.log(1 + est.ci.high)
    assert (lo + hi) / 2 == pytest.approx(math.log(1.2))
    assert (hi - lo) / 2 == pytest.approx(1.959964 * se, rel=1e-6)
    assert est.ci.low < 0 < est.ci.high  # 12 % vs 10 % on 1,000 users each: not resolved


def test_relative_uplift_edges() -> None:
    assert relative_uplift(5, 100, 0, 100) is None  # no control conversion: no ratio
    none_treated = relative_uplift(0, 100, 10, 100)
    assert none_treated is not None
    assert none_treated.value == -1.0 and none_treated.ci.low == -1.0
    assert -1.0 < none_treated.ci.high < 0.0  # 0/100 against 10/100 is clearly lower


# --- χ² tail -----------------------------------------------------------------------------

# Tabulated upper critical values (any χ² table, e.g. NIST/SEMATECH e-Handbook 1.3.6.7.4).
CHI2_TABLE = [
    (3.841458820694124, 1, 0.05),
    (6.634896601021214, 1, 0.01),
    (10.827566170662733, 1, 0.001),
    (5.991464547107979, 2, 0.05),
    (11.070497693516351, 5, 0.05),
    (15.08627246938899, 5, 0.01),
    (20.515005652432873, 5, 0.001),
    (1.6103079869623229, 5, 0.90),
    (18.307038053275146, 10, 0.05),
    (43.77297182574219, 30, 0.05),
]


@pytest.mark.parametrize(("x", "df", "p"), CHI2_TABLE)
def test_chi2_sf_critical_values(x: float, df: int, p: float) -> None:
    assert chi2_sf(x, df) == pytest.approx(p, rel=1e-6)


def test_chi2_sf_the_brief_values() -> None:
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(6.6349, 1) == pytest.approx(0.01, rel=1e-4)


def test_chi2_sf_closed_forms_over_a_range() -> None:
    """df = 1: erfc(√(x/2)); even df = 2k: e^(−x/2)·Σ_{j<k} (x/2)^j / j!; both cross the
    series / continued fraction switch at x/2 = df/2 + 1."""
    xs = [0.01 * 1.25 ** i for i in range(45)]  # 0.01 … ~ 230
    for x in xs:
        assert chi2_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-9, abs=1e-300)
        for k in (1, 2, 3, 6):
            even = math.exp(-x / 2) * sum((x / 2) ** j / math.factorial(j) for j in range(k))
            assert chi2_sf(x, 2 * k) == pytest.approx(even, rel=1e-9, abs=1e-300), (x, 2 * k)


def test_chi2_sf_edges() -> None:
    assert chi2_sf(0.0, 3) == 1.0 and chi2_sf(-1.0, 3) == 1.0
    assert chi2_sf(math.inf, 3) == 0.0
    with pytest.raises(ValueError):
        chi2_sf(1.0, 0)


# --- sample ratio mismatch -------------------------------------------------------------

def test_srm_two_arms() -> None:
    # 20,500 users, 50/50: expected 10,250 each, χ² = 2·250²/10,250 = 12.195, p ≈ 0.00048.
    broken = sample_ratio_mismatch([10_000, 10_500], [0.5, 0.5])
    assert broken.chi2 == pytest.approx(2 * 250**2 / 10_250)
    assert broken.p_value < 0.001 and broken.flagged
    # 10,000 vs 10,400 (χ² = 7.84, p ≈ 0.005) is suspicious but not below 0.001.
    close = sample_ratio_mismatch([10_000, 10_400], [1, 1])
    assert close.chi2 == pytest.approx(2 * 200**2 / 10_200)
    assert close.p_value == pytest.approx(math.erfc(math.sqrt(close.chi2 / 2)))
    assert 0.001 < close.p_value < 0.01 and not close.flagged
    fine = sample_ratio_mismatch([10_000, 10_050], [0.5, 0.5])
    assert fine.p_value > 0.5 and not fine.flagged


def test_srm_uneven_split_and_edges() -> None:
    # 10 % holdout: 1,000 of 10,000 is exactly on plan; 1,150 is far off.
    assert sample_ratio_mismatch([1_000, 9_000], [10, 90]).chi2 == pytest.approx(0.0)
    assert sample_ratio_mismatch([1_150, 8_850], [10, 90]).flagged
    assert sample_ratio_mismatch([0, 0], [1, 1]).p_value == 1.0
    leak = sample_ratio_mismatch([5, 100, 100], [0, 1, 1])  # users in a 0-weight arm
    assert leak.flagged and leak.p_value == 0.0
    with pytest.raises(ValueError):
        sample_ratio_mismatch([1, 2], [1])


# --- simulations -----------------------------------------------------------------------

SIMS = 200
USERS = 4_000


def binomial(rng: random.Random, n: int, p: float) -> int:
    return sum(rng.random() < p for _ in range(n))


def test_known_effect_interval_covers_the_truth() -> None:
    """+2 pp (10 % → 12 %): the 95 % intervals of the absolute and relative uplift cover
    the true effect in at least 93 % of 200 seeded simulations."""
    covered_abs = covered_rel = significant = 0
    for seed in range(SIMS):
        rng = random.Random(seed)
        x0, x1 = binomial(rng, USERS, 0.10), binomial(rng, USERS, 0.12)
        report = analyse([Arm("control", USERS, x0, 1, control=True),
                          Arm("treated", USERS, x1, 1)])
        c = report.comparisons[0]
        covered_abs += c.absolute.ci.contains(0.02)
        assert c.relative is not None
        covered_rel += c.relative.ci.contains(0.2)
        significant += c.significant
    assert covered_abs / SIMS >= 0.93, f"absolute coverage {covered_abs / SIMS:.1%}"
    assert covered_rel / SIMS >= 0.93, f"relative coverage {covered_rel / SIMS:.1%}"
    # and the test has power: +2 pp on 4,000 per arm is found most of the time (~80 %)
    assert significant / SIMS >= 0.6, f"power {significant / SIMS:.1%}"


def test_a_a_split_is_rarely_significant() -> None:
    flagged = 0
    for seed in range(SIMS):
        rng = random.Random(10_000 + seed)
        x0, x1 = binomial(rng, USERS, 0.10), binomial(rng, USERS, 0.10)
        report = analyse([Arm("control", USERS, x0, 1, control=True),
                          Arm("treated", USERS, x1, 1)])
        flagged += report.comparisons[0].significant
    assert flagged / SIMS <= 0.07, f"A/A false positives {flagged / SIMS:.1%}"


# --- the report and its verdicts -------------------------------------------------------

def test_verdict_real_effect() -> None:
    report = analyse([Arm("control", 5_000, 500, 1, control=True),
                      Arm("treatment", 5_000, 610, 1)])
    c = report.comparisons[0]
    assert c.significant and c.absolute.value == pytest.approx(0.022)
    lo, hi = c.absolute.ci.low * 100, c.absolute.ci.high * 100
    assert report.verdict == (f"Treatment converts 2.2 pp better (95% CI {lo:.1f} to {hi:.1f} "
                              "pp): a real effect.")
    worse = analyse([Arm("control", 5_000, 610, 1, control=True),
                     Arm("treatment", 5_000, 500, 1)])
    assert worse.verdict.startswith("Treatment converts 2.2 pp worse (95% CI -")


def test_verdict_no_difference_says_how_many_more_users() -> None:
    report = analyse([Arm("control", 2_000, 200, 1, control=True),
                      Arm("treatment", 2_000, 205, 1)])
    c = report.comparisons[0]
    assert not c.significant and c.absolute.ci.low < 0 < c.absolute.ci.high
    # normal-approximation sample size for 10 % → 11 % at 80 % power, written out here
    z_a, z_b = 1.959964, 0.841621
    need = math.ceil((z_a + z_b) ** 2 * (0.1 * 0.9 + 0.11 * 0.89) / 0.01**2)
    assert users_to_detect(0.10) == need  # ≈ 14,750
    assert f"about {need - 2_000:,} more users per arm would detect a 1 pp effect." in c.verdict
    assert c.verdict.startswith("Treatment: no detectable difference yet (95% CI -")
    big = analyse([Arm("control", 40_000, 4_000, 1, control=True),
                   Arm("treatment", 40_000, 4_010, 1)])
    assert "large enough to detect a 1 pp effect" in big.verdict


def test_verdict_sample_ratio_mismatch_overrides() -> None:
    report = analyse([Arm("control", 10_000, 1_000, 1, control=True),
                      Arm("treatment", 10_500, 1_400, 1)])
    assert report.srm.flagged and report.comparisons[0].significant
    p = math.erfc(math.sqrt(report.srm.chi2 / 2))  # ≈ 0.00048
    expected = (f"Sample ratio mismatch (p = {p:.4f}): the split is broken; "
                "do not trust this result.")
    assert 0.0001 < p < 0.001 and report.verdict == expected
    assert report.comparisons[0].verdict == expected
    worse = analyse([Arm("control", 10_000, 1_000, 1, control=True),
                     Arm("treatment", 11_000, 1_100, 1)])
    assert worse.verdict.startswith("Sample ratio mismatch (p < 0.0001): the split is broken")


def test_verdict_too_few_users() -> None:
    report = analyse([Arm("control", 40, 4, 1, control=True), Arm("treatment", 45, 9, 1)])
    assert report.verdict.startswith("Too few users to say anything yet")
    assert not report.srm.flagged


def test_variants_each_compared_with_control_and_to_dict_is_json() -> None:
    report = analyse([Arm("holdout", 1_000, 100, 10, control=True),
                      Arm("treated", 4_480, 560, 45, variant="A"),
                      Arm("treated", 4_520, 460, 45, variant="B")])
    assert [(c.arm, c.variant) for c in report.comparisons] == [("treated", "A"),
                                                                ("treated", "B")]
    assert report.comparisons[0].verdict.startswith("Treated (variant A) converts 2.5 pp better")
    assert report.comparisons[1].verdict.startswith("Treated (variant B): no detectable")
    assert report.arms[1].rate.value == pytest.approx(0.125)
    assert report.arms[1].rate.ci.low == wilson(560, 4_480).low
    doc = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert doc["arms"][0] == {"name": "holdout", "variant": None, "control": True,
                              "exposed": 1_000, "converted": 100,
                              "rate": {"value": 0.1, "low": wilson(100, 1_000).low,
                                       "high": wilson(100, 1_000).high}}
    assert doc["comparisons"][0]["significant"] is True
    assert doc["srm"]["flagged"] is False and doc["srm"]["df"] == 2
    assert doc["verdict"] == " ".join(c.verdict for c in report.comparisons)


def test_to_dict_with_an_infinite_chi2_is_still_json() -> None:
    report = analyse([Arm("control", 500, 50, 1, control=True), Arm("treated", 500, 60, 1),
                      Arm("retired", 20, 2, 0)])
    assert report.srm.flagged
    doc = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert doc["srm"]["chi2"] is None and doc["srm"]["p_value"] == 0.0


def test_analyse_refuses_malformed_input() -> None:
    with pytest.raises(ValueError):
        analyse([Arm("a", 10, 1, 1), Arm("b", 10, 1, 1)])  # no control
    with pytest.raises(ValueError):
        analyse([Arm("a", 10, 1, 1, control=True)])  # nothing to compare
    with pytest.raises(ValueError):
        analyse([Arm("a", 10, 11, 1, control=True), Arm("b", 10, 1, 1)])  # more than exposed
