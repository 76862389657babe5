"""The statistics of the report: per-variant estimates and variant-vs-control tests.

The unit is the user: one user's recommendations (and purchases) are correlated, so
treating items as independent would make intervals too narrow. Every metric is a ratio
of per-user sums, sum(numerator) / sum(denominator), over the users of a variant:

- per-user metrics (purchases, revenue per user): denominator 1 per user, a plain mean;
- shares (of items shown later viewed, carted, bought): denominator = items shown.

Its standard error is the delta method's over users (Deng, Knoblich and Lu 2018,
"Applying the Delta Method in Metric Analytics"), analytic and fast (the A/A test runs
it hundreds of times). A variant is compared with the control on the relative
difference, estimate_B / estimate_A - 1, again by the delta method (the two groups are
independent), with a two-sided z test. Several variants against one control are
Bonferroni-corrected, tests and intervals alike, so that the interval printed next to a
verdict always agrees with it (Holm would reject a little more often but has no matching
intervals). Normal approximations: fine from a few dozen users a variant, which the
report says when a variant has fewer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

POWER = 0.8  # for the smallest difference a comparison could detect
FEW_USERS = 30  # below this the normal approximation is doubtful: the report says so


@dataclass(frozen=True)
class Estimate:
    """A metric over one variant's users: the value, its standard error, the users."""

    value: float
    se: float
    users: int


@dataclass(frozen=True)
class Comparison:
    """A variant against the control on one metric (relative differences as fractions)."""

    variant: str
    control: str
    lift: float | None  # variant / control - 1; None when the control's value is 0
    ci_low: float | None  # at confidence 1 - alpha / comparisons
    ci_high: float | None
    difference: float  # variant - control, in the metric's own unit
    p_value: float  # Bonferroni-adjusted, two-sided
    significant: bool
    detectable: float | None  # the relative difference found with POWER at this size
    confidence: float  # the level of the interval (1 - alpha / comparisons)


def ratio_estimate(numerators: np.ndarray, denominators: np.ndarray | None = None) -> Estimate:
    """sum(numerators) / sum(denominators) over users, with its delta-method standard
    error; denominators None: the mean of numerators (standard error s / sqrt(n))."""
    y = np.asarray(numerators, np.float64)
    n = len(y)
    if n == 0:
        return Estimate(math.nan, math.nan, 0)
    if denominators is None:
        se = float(y.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
        return Estimate(float(y.mean()), se, n)
    x = np.asarray(denominators, np.float64)
    mx, my = x.mean(), y.mean()
    if mx <= 0:
        return Estimate(math.nan, math.nan, n)
    value = my / mx
    if n < 2:
        return Estimate(float(value), math.nan, n)
    cov = np.cov(y, x, ddof=1)
    var = (cov[0, 0] - 2 * value * cov[0, 1] + value**2 * cov[1, 1]) / (mx**2 * n)
    return Estimate(float(value), float(math.sqrt(max(var, 0.0))), n)


def compare(estimates: dict[str, Estimate], control: str, alpha: float = 0.05) -> list[Comparison]:
    """Each variant other than `control` against it, Bonferroni across them."""
    if control not in estimates:
        raise KeyError(control)
    others = [v for v in estimates if v != control]
    m = max(len(others), 1)
    z_crit = float(norm.ppf(1 - alpha / (2 * m)))
    z_power = float(norm.ppf(POWER))
    a = estimates[control]
    found = []
    for name in others:
        b = estimates[name]
        difference = b.value - a.value
        lift = low = high = detectable = None
        if a.value > 0 and math.isfinite(b.value):
            ratio = b.value / a.value
            lift = ratio - 1
            se = math.sqrt(b.se**2 / a.value**2 + ratio**2 * a.se**2 / a.value**2)
            low, high = lift - z_crit * se, lift + z_crit * se
            # under "no difference" the spread of the lift is about that of two controls
            detectable = (z_crit + z_power) * math.sqrt(b.se**2 + a.se**2) / a.value
            z = _z(lift, se)
        else:  # no relative scale: test the plain difference
            se = math.sqrt(b.se**2 + a.se**2)
            z = _z(difference, se)
        p = math.nan if math.isnan(z) else min(1.0, m * 2 * float(norm.sf(abs(z))))
        found.append(
            Comparison(
                variant=name,
                control=control,
                lift=lift,
                ci_low=low,
                ci_high=high,
                difference=difference,
                p_value=p,
                significant=p < alpha,
                detectable=detectable,
                confidence=1 - alpha / m,
            )
        )
    return found


def _z(delta: float, se: float) -> float:
    """delta / se; a zero se (no spread at all) gives 0 for no difference, else inf."""
    if math.isnan(delta) or math.isnan(se):
        return math.nan
    if se > 0:
        return delta / se
    return 0.0 if delta == 0 else math.inf
