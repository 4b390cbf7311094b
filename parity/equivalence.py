"""Equivalence of two trainers from paired per-seed results: TOST on the differences.

Each seed trains both frameworks on the same data, order and initial weights, so the natural
sample is the per-seed difference ``d_i = metric_test(seed i) - metric_reference(seed i)``.
Its mean has a Student-t confidence interval with ``n - 1`` degrees of freedom. With the
``1 - 2 * alpha`` two-sided interval (90% for ``alpha = 0.05``), the verdict against an
equivalence margin ``m`` is:

* **equivalent**: the interval lies inside ``(-m, +m)``. This is the two one-sided tests
  (TOST) at level ``alpha``: both ``mean > -m`` and ``mean < +m`` are shown.
* **different**: the interval lies wholly outside ``[-m, +m]`` (its lower end above ``+m`` or
  its upper end below ``-m``): the gap exceeds the margin, by the same one-sided level.
* **inconclusive**: anything else, and always below ``min_n`` pairs (no verdict either way
  on fewer). :func:`seeds_needed` then gives the pair count at which the observed spread and
  mean would decide, taking them as the truth.

:func:`detectable_shift` is the smallest true mean difference a one-sided test at ``alpha``
finds with the given power, from the spread and the pair count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy import stats

EQUIVALENT = "equivalent"
DIFFERENT = "different"
INCONCLUSIVE = "inconclusive"
# Pair counts searched by seeds_needed; beyond it the gap is taken as out of reach.
MAX_SEEDS = 1000


@dataclass(frozen=True)
class Effect:
    """Mean of paired differences with its two-sided confidence interval.

    Attributes:
        n: Pairs.
        mean: Mean difference (test - reference).
        sd: Sample standard deviation of the differences (NaN below two pairs).
        ci_low: Lower end of the interval (NaN below two pairs).
        ci_high: Upper end.
        confidence: Two-sided level of the interval (e.g. 0.9).
    """

    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float
    confidence: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Equivalence:
    """The TOST verdict of one metric (see the module docstring for the rule).

    Attributes:
        effect: The paired mean difference and its ``1 - 2 * alpha`` interval.
        margin: Equivalence margin, in the metric's units.
        alpha: One-sided level of each test.
        min_n: Fewest pairs that may give a verdict other than inconclusive.
        p_value: TOST p-value (the larger of the two one-sided p-values; NaN below two pairs).
        verdict: :data:`EQUIVALENT`, :data:`DIFFERENT` or :data:`INCONCLUSIVE`.
        seeds_needed: Total pairs at which the observed mean and spread would decide (None when
            out of reach: a mean on the margin, or more than :data:`MAX_SEEDS`).
        more_seeds: ``seeds_needed - n`` when inconclusive (None when out of reach), else 0.
        detectable_shift: Smallest true mean difference found with ``power`` by a one-sided
            test at ``alpha`` with this spread and pair count (NaN below two pairs).
        detectable_difference: ``margin + detectable_shift``: the smallest true gap the rule
            calls different with that power.
        power: Power of the two figures above.
    """

    effect: Effect
    margin: float
    alpha: float
    min_n: int
    p_value: float
    verdict: str
    seeds_needed: int | None
    more_seeds: int | None
    detectable_shift: float
    detectable_difference: float
    power: float

    def as_dict(self) -> dict:
        out = asdict(self)
        out["effect"] = self.effect.as_dict()
        return out

    def describe(self) -> str:
        """One line: verdict, mean, interval, margin (and the seeds still needed)."""
        e = self.effect
        interval = (f"{100 * e.confidence:.0f}% CI [{e.ci_low:+.3f}, {e.ci_high:+.3f}]"
                    if e.n >= 2 else "no interval from one seed")
        text = f"{self.verdict}: mean {e.mean:+.3f}, {interval} vs margin +-{self.margin:g} (n={e.n})"
        if self.verdict == INCONCLUSIVE:
            text += (f"; needs {self.more_seeds} more seeds" if self.more_seeds is not None
                     else "; more seeds cannot decide at this mean (it sits on the margin)")
        return text


def _checked(values: Sequence[float], what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{what} must be a flat sequence of numbers, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} must be finite numbers, got {array.tolist()}")
    return array


def paired_differences(test: Sequence[float], reference: Sequence[float]) -> np.ndarray:
    """``test - reference`` per pair.

    Raises:
        ValueError: If the lengths differ or a value is not finite.
    """
    t, r = _checked(test, "test values"), _checked(reference, "reference values")
    if t.shape != r.shape:
        raise ValueError(f"paired samples need equal lengths, got {len(t)} test and {len(r)} "
                         f"reference values")
    return t - r


def _check_levels(alpha: float, power: float | None = None) -> None:
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must lie in (0, 0.5), got {alpha}")
    if power is not None and not 0.5 <= power < 1:
        raise ValueError(f"power must lie in [0.5, 1), got {power}")


def mean_effect(diffs: Sequence[float], confidence: float) -> Effect:
    """Mean and two-sided Student-t interval of paired differences.

    Raises:
        ValueError: If ``diffs`` is empty or not finite, or ``confidence`` not in (0, 1).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    d = _checked(diffs, "differences")
    if d.size == 0:
        raise ValueError("no differences: at least one pair is needed")
    mean = float(d.mean())
    if d.size < 2:
        return Effect(1, mean, math.nan, math.nan, math.nan, confidence)
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, d.size - 1)) * sd / math.sqrt(d.size)
    return Effect(int(d.size), mean, sd, mean - half, mean + half, confidence)


def seeds_needed(mean: float, sd: float, margin: float, alpha: float, min_n: int) -> int | None:
    """Fewest pairs whose ``1 - 2 * alpha`` interval around ``mean``, with spread ``sd``, falls
    wholly inside the margin (``|mean| < margin``) or wholly outside it (``|mean| > margin``).

    Returns None when no count up to :data:`MAX_SEEDS` does (``|mean|`` on the margin, or a
    gap too small for the spread).
    """
    _check_levels(alpha)
    gap = abs(margin - abs(mean))
    if gap == 0:
        return None
    start = max(min_n, 2)
    if sd == 0:
        return start
    for n in range(start, MAX_SEEDS + 1):
        if stats.t.ppf(1 - alpha, n - 1) * sd / math.sqrt(n) < gap:
            return n
    return None


def detectable_shift(sd: float, n: int, alpha: float, power: float) -> float:
    """Smallest true mean difference that a one-sided t test at ``alpha`` detects with
    ``power``: ``(t_{1-alpha} + t_{power}) * sd / sqrt(n)`` with ``n - 1`` degrees of freedom
    (NaN below two pairs)."""
    _check_levels(alpha, power)
    if n < 2 or not math.isfinite(sd):
        return math.nan
    df = n - 1
    return float((stats.t.ppf(1 - alpha, df) + stats.t.ppf(power, df)) * sd / math.sqrt(n))


def tost(diffs: Sequence[float], margin: float, alpha: float = 0.05, min_n: int = 3,
         power: float = 0.8) -> Equivalence:
    """The verdict on paired differences against ``+-margin`` (rule: module docstring).

    Args:
        diffs: Per-pair ``test - reference`` (e.g. AP points per seed).
        margin: Equivalence margin (> 0), in the units of ``diffs``.
        alpha: One-sided level of each test; the interval is ``1 - 2 * alpha`` two-sided.
        min_n: Fewest pairs that may give a verdict (at least 2).
        power: Power of the detectable-difference figures.

    Raises:
        ValueError: On an empty or non-finite sample, a margin <= 0, ``min_n < 2``, or levels
            out of range.
    """
    if not (math.isfinite(margin) and margin > 0):
        raise ValueError(f"margin must be a positive number, got {margin}")
    if min_n < 2:
        raise ValueError(f"min_n must be at least 2 (a spread needs two pairs), got {min_n}")
    _check_levels(alpha, power)
    effect = mean_effect(diffs, 1 - 2 * alpha)
    n = effect.n
    if n < 2:
        p_value = math.nan
        verdict = INCONCLUSIVE
        needed = max(min_n, 2)
    else:
        se = effect.sd / math.sqrt(n)
        if se == 0:
            p_value = 0.0 if abs(effect.mean) < margin else 1.0
        else:
            p_lower = stats.t.sf((effect.mean + margin) / se, n - 1)
            p_upper = stats.t.cdf((effect.mean - margin) / se, n - 1)
            p_value = float(max(p_lower, p_upper))
        if n < min_n:
            verdict = INCONCLUSIVE
        elif -margin < effect.ci_low and effect.ci_high < margin:
            verdict = EQUIVALENT
        elif effect.ci_low > margin or effect.ci_high < -margin:
            verdict = DIFFERENT
        else:
            verdict = INCONCLUSIVE
        needed = seeds_needed(effect.mean, effect.sd, margin, alpha, min_n)
        if needed is not None and verdict == INCONCLUSIVE:
            needed = max(needed, n + 1)
    more = (None if needed is None else needed - n) if verdict == INCONCLUSIVE else 0
    shift = detectable_shift(effect.sd, n, alpha, power)
    return Equivalence(effect=effect, margin=float(margin), alpha=float(alpha), min_n=int(min_n),
                       p_value=p_value, verdict=verdict, seeds_needed=needed, more_seeds=more,
                       detectable_shift=shift, detectable_difference=margin + shift,
                       power=float(power))
