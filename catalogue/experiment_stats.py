"""What a holdout or variant test says: conversion rates, uplift with 95 % intervals, a
sample-ratio-mismatch check and a verdict in plain words. Pure arithmetic on counts.

The methods, chosen for counts of users who converted or not:

* a rate's interval is the **Wilson score** interval (:func:`wilson`): it stays inside
  [0, 1] and keeps close to its nominal coverage for small counts and rates near 0,
  where the textbook p ± z·√(p(1−p)/n) does not;
* the **absolute uplift** p₁ − p₀ (treated minus control) has the **Newcombe (1998,
  method 10) hybrid score** interval built from the two Wilson intervals
  (:func:`newcombe_diff`); an arm "converts better" when that interval excludes 0;
* the **relative uplift** p₁/p₀ − 1 has the **Katz log-ratio** interval
  (:func:`relative_uplift`); none when the control arm has no conversion;
* the **sample ratio mismatch** check (:func:`sample_ratio_mismatch`) is Pearson's χ²
  goodness of fit of the users per arm against the configured split, flagged below
  p = 0.001: a broken split (a holdout leaking, a variant that crashes) biases every
  other number here, so it overrides the verdict.

χ² tail probabilities come from :func:`chi2_sf`, the regularized upper incomplete gamma
function by its series or continued fraction, so nothing beyond the standard library
is needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

__all__ = [
    "MIN_USERS",
    "SRM_ALPHA",
    "Z95",
    "Arm",
    "ArmReport",
    "Comparison",
    "Estimate",
    "ExperimentReport",
    "Interval",
    "SRM",
    "analyse",
    "chi2_sf",
    "newcombe_diff",
    "relative_uplift",
    "sample_ratio_mismatch",
    "users_to_detect",
    "wilson",
]

Z95 = 1.959963984540054  # NormalDist().inv_cdf(0.975)
SRM_ALPHA = 0.001
MIN_USERS = 100  # per arm, below which no verdict is given
DETECT_PP = 0.01  # the effect size the "how many more users" hint is about (1 pp)
POWER = 0.8  # ... and the probability of detecting it


@dataclass(frozen=True)
class Interval:
    """A confidence interval, ``low`` ≤ ``high``."""

    low: float
    high: float

    def excludes(self, value: float) -> bool:
        """Whether ``value`` lies outside the interval."""
        return value < self.low or value > self.high

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies inside the interval (ends included)."""
        return not self.excludes(value)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95 % interval."""

    value: float
    ci: Interval


@dataclass(frozen=True)
class SRM:
    """Pearson's χ² of the users per arm against the expected split."""

    chi2: float
    df: int
    p_value: float
    flagged: bool


def wilson(successes: int, n: int, z: float = Z95) -> Interval:
    """The Wilson score interval of the proportion ``successes / n``; (0, 1) when n == 0::

        centre = (p + z²/2n) / (1 + z²/n),  half = z·√(p(1−p)/n + z²/4n²) / (1 + z²/n)
    """
    _check_counts(successes, n)
    if n == 0:
        return Interval(0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(low, high)


def newcombe_diff(x1: int, n1: int, x0: int, n0: int, z: float = Z95) -> Estimate:
    """p₁ − p₀ (``x1/n1`` treated minus ``x0/n0`` control) with the Newcombe (1998, method
    10) hybrid score interval. With (l₁, u₁) and (l₀, u₀) the Wilson intervals of p₁ and
    p₀ and D = p₁ − p₀::

        low  = D − √((p₁ − l₁)² + (u₀ − p₀)²)
        high = D + √((u₁ − p₁)² + (p₀ − l₀)²)

    An empty arm counts as a rate of 0 with the interval (0, 1), so the result is
    uninformative rather than an error.
    """
    p1 = x1 / n1 if n1 else 0.0
    p0 = x0 / n0 if n0 else 0.0
    l1, u1 = _pair(wilson(x1, n1, z))
    l0, u0 = _pair(wilson(x0, n0, z))
    d = p1 - p0
    low = d - math.sqrt((p1 - l1) ** 2 + (u0 - p0) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p0 - l0) ** 2)
    return Estimate(d, Interval(max(-1.0, low), min(1.0, high)))


def relative_uplift(x1: int, n1: int, x0: int, n0: int, z: float = Z95) -> Estimate | None:
    """p₁/p₀ − 1 with the Katz log-ratio interval; None when p₀ = 0 (no ratio exists) or
    the treated arm is empty::

        se = √(1/x₁ − 1/n₁ + 1/x₀ − 1/n₀),  ratio interval = (p₁/p₀)·exp(∓z·se)

    When the treated arm has no conversion the ratio is 0 (an uplift of −100 %), its
    logarithm does not exist, and the interval's high end is computed with 0.5 added to
    every cell (Haldane–Anscombe) while its low end is −100 %.
    """
    _check_counts(x1, n1)
    _check_counts(x0, n0)
    if x0 == 0 or n1 == 0:
        return None
    p1, p0 = x1 / n1, x0 / n0
    if x1 == 0:
        a, b, c, d = 0.5, n1 + 1.0, x0 + 0.5, n0 + 1.0
        se = math.sqrt(1 / a - 1 / b + 1 / c - 1 / d)
        high = (a / b) / (c / d) * math.exp(z * se)
        return Estimate(-1.0, Interval(-1.0, high - 1.0))
    se = math.sqrt(1 / x1 - 1 / n1 + 1 / x0 - 1 / n0)
    ratio = p1 / p0
    return Estimate(ratio - 1.0, Interval(ratio * math.exp(-z * se) - 1.0,
                                          ratio * math.exp(z * se) - 1.0))


def chi2_sf(x: float, df: int) -> float:
    """P(X ≥ x) for X χ²-distributed with ``df`` degrees of freedom: the regularized upper
    incomplete gamma function Q(df/2, x/2)."""
    if df <= 0:
        raise ValueError("df must be positive")
    if math.isnan(x):
        raise ValueError("x must be a number")
    if x <= 0:
        return 1.0
    if math.isinf(x):
        return 0.0
    return _gamma_q(df / 2, x / 2)


def sample_ratio_mismatch(observed_counts: Sequence[int], expected_weights: Sequence[float],
                          alpha: float = SRM_ALPHA) -> SRM:
    """Pearson's χ² goodness of fit of the users per arm against the split weights (any
    scale; they need not sum to 1), flagged when p < ``alpha``. An arm with weight 0 and
    any user in it is a broken split outright (χ² infinite, p = 0)."""
    if len(observed_counts) != len(expected_weights):
        raise ValueError("one weight per arm")
    if any(w < 0 for w in expected_weights) or any(o < 0 for o in observed_counts):
        raise ValueError("counts and weights must not be negative")
    total_w = float(sum(expected_weights))
    if total_w <= 0:
        raise ValueError("weights must have a positive sum")
    n = sum(observed_counts)
    cells = [(o, w) for o, w in zip(observed_counts, expected_weights, strict=True) if w > 0]
    df = len(cells) - 1
    if any(o > 0 for o, w in zip(observed_counts, expected_weights, strict=True) if w == 0):
        return SRM(math.inf, max(df, 1), 0.0, True)
    if n == 0 or df < 1:
        return SRM(0.0, max(df, 1), 1.0, False)
    chi2 = 0.0
    for o, w in cells:
        e = n * w / total_w
        chi2 += (o - e) ** 2 / e
    p = chi2_sf(chi2, df)
    return SRM(chi2, df, p, p < alpha)


def users_to_detect(p0: float, delta: float = DETECT_PP, power: float = POWER,
                    z: float = Z95) -> int:
    """Users per arm a two-arm test needs to find an absolute difference ``delta`` from a
    base rate ``p0`` with probability ``power`` (normal approximation)::

        n = (z + z_power)² · (p₀(1 − p₀) + p₁(1 − p₁)) / δ²,  p₁ = p₀ + δ (or p₀ − δ near 1)
    """
    p1 = p0 + delta if p0 + delta <= 1 else p0 - delta
    z_power = NormalDist().inv_cdf(power)
    var = p0 * (1 - p0) + p1 * (1 - p1)
    return math.ceil((z + z_power) ** 2 * var / (delta * delta))


@dataclass(frozen=True)
class Arm:
    """Counts of one arm. ``control`` marks the holdout every other arm is compared with
    (exactly one per experiment); ``weight`` is its configured share of users (any scale)."""

    name: str
    exposed: int
    converted: int
    weight: float
    control: bool = False
    variant: str | None = None


@dataclass(frozen=True)
class ArmReport:
    """One arm's conversion rate with its Wilson interval."""

    name: str
    variant: str | None
    control: bool
    exposed: int
    converted: int
    rate: Estimate


@dataclass(frozen=True)
class Comparison:
    """A treated arm against the control."""

    arm: str
    variant: str | None
    absolute: Estimate
    relative: Estimate | None
    significant: bool
    verdict: str


@dataclass(frozen=True)
class ExperimentReport:
    """Per-arm rates, each treated arm against the control, the SRM check and a verdict."""

    arms: tuple[ArmReport, ...]
    comparisons: tuple[Comparison, ...]
    srm: SRM
    verdict: str
    min_users: int = field(default=MIN_USERS)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready document (no NaN or infinity: an infinite χ² is null)."""
        return {
            "arms": [{"name": a.name, "variant": a.variant, "control": a.control,
                      "exposed": a.exposed, "converted": a.converted,
                      "rate": _estimate_dict(a.rate)} for a in self.arms],
            "comparisons": [{"arm": c.arm, "variant": c.variant,
                             "absolute_uplift": _estimate_dict(c.absolute),
                             "relative_uplift": (None if c.relative is None
                                                 else _estimate_dict(c.relative)),
                             "significant": c.significant, "verdict": c.verdict}
                            for c in self.comparisons],
            "srm": {"chi2": self.srm.chi2 if math.isfinite(self.srm.chi2) else None,
                    "df": self.srm.df, "p_value": self.srm.p_value,
                    "flagged": self.srm.flagged, "alpha": SRM_ALPHA},
            "verdict": self.verdict,
            "confidence": 0.95,
            "methods": {"rate": "Wilson score", "absolute_uplift": "Newcombe hybrid score",
                        "relative_uplift": "Katz log ratio",
                        "srm": "Pearson chi-square goodness of fit"},
            "min_users": self.min_users,
        }


def analyse(arms: Sequence[Arm], min_users: int = MIN_USERS) -> ExperimentReport:
    """The report for one experiment: exactly one control arm and one or more treated arms
    (a treated arm per content variant, say), each compared with the control."""
    controls = [a for a in arms if a.control]
    if len(controls) != 1:
        raise ValueError("exactly one arm must be the control")
    if len(arms) < 2:
        raise ValueError("at least one treated arm is needed")
    for a in arms:
        _check_counts(a.converted, a.exposed)
    control = controls[0]
    srm = sample_ratio_mismatch([a.exposed for a in arms], [a.weight for a in arms])
    reports = tuple(ArmReport(a.name, a.variant, a.control, a.exposed, a.converted,
                              Estimate(a.converted / a.exposed if a.exposed else 0.0,
                                       wilson(a.converted, a.exposed)))
                    for a in arms)
    comparisons = tuple(_compare(a, control, srm, min_users) for a in arms if not a.control)
    if srm.flagged:
        verdict = _srm_sentence(srm)
    else:
        verdict = " ".join(c.verdict for c in comparisons)
    return ExperimentReport(reports, comparisons, srm, verdict, min_users)


def _compare(arm: Arm, control: Arm, srm: SRM, min_users: int) -> Comparison:
    absolute = newcombe_diff(arm.converted, arm.exposed, control.converted, control.exposed)
    relative = relative_uplift(arm.converted, arm.exposed, control.converted, control.exposed)
    significant = absolute.ci.excludes(0.0)
    label = _label(arm)
    ci = f"95% CI {_pp(absolute.ci.low)} to {_pp(absolute.ci.high)} pp"
    if srm.flagged:
        verdict = _srm_sentence(srm)
    elif min(arm.exposed, control.exposed) < min_users:
        verdict = (f"Too few users to say anything yet ({label}: {arm.exposed}, control: "
                   f"{control.exposed}; at least {min_users} per arm needed).")
    elif significant:
        direction = "better" if absolute.value > 0 else "worse"
        verdict = (f"{label} converts {_pp(abs(absolute.value))} pp {direction} ({ci}): "
                   "a real effect.")
    else:
        p0 = control.converted / control.exposed
        more = users_to_detect(p0) - min(arm.exposed, control.exposed)
        if more > 0:
            verdict = (f"{label}: no detectable difference yet ({ci}); about {more:,} more "
                       f"users per arm would detect a {DETECT_PP * 100:g} pp effect.")
        else:
            verdict = (f"{label}: no detectable difference ({ci}); the arms are large enough "
                       f"to detect a {DETECT_PP * 100:g} pp effect, so any effect is likely "
                       "smaller.")
    return Comparison(arm.name, arm.variant, absolute, relative, significant, verdict)


def _srm_sentence(srm: SRM) -> str:
    p = "p < 0.0001" if srm.p_value < 0.0001 else f"p = {srm.p_value:.4f}"
    return f"Sample ratio mismatch ({p}): the split is broken; do not trust this result."


def _label(arm: Arm) -> str:
    name = arm.name[:1].upper() + arm.name[1:]
    return f"{name} (variant {arm.variant})" if arm.variant else name


def _pp(fraction: float) -> str:
    """A fraction in percentage points with one decimal ("-0.0" written as "0.0")."""
    text = f"{fraction * 100:.1f}"
    return "0.0" if text == "-0.0" else text


def _estimate_dict(e: Estimate) -> dict[str, float]:
    return {"value": e.value, "low": e.ci.low, "high": e.ci.high}


def _pair(i: Interval) -> tuple[float, float]:
    return i.low, i.high


def _check_counts(successes: int, n: int) -> None:
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")


_EPS = 1e-15
_TINY = 1e-300
_MAX_ITER = 10_000


def _gamma_q(a: float, x: float) -> float:
    """Q(a, x) = Γ(a, x)/Γ(a) for a > 0, x > 0 (Numerical Recipes §6.2): the series of
    P = 1 − Q below x = a + 1, Lentz's continued fraction for Q above."""
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        ap = a
        for _ in range(_MAX_ITER):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * _EPS:
                return max(0.0, 1.0 - total * math.exp(log_front))
        raise ArithmeticError("incomplete gamma series did not converge")
    b = x + 1 - a
    c = 1 / _TINY
    d = 1 / b
    h = d
    for i in range(1, _MAX_ITER):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = _TINY if abs(d) < _TINY else d
        c = b + an / c
        c = _TINY if abs(c) < _TINY else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < _EPS:
            return min(1.0, math.exp(log_front) * h)
    raise ArithmeticError("incomplete gamma continued fraction did not converge")
