"""When is a difference between two fine-tuning methods real? Paired seeds, a t interval, and Holm's rule.

The rule lora_lab's comparisons follow:
1. Paired seeds. Both methods run with the same seeds, and the same seed gives both the same data order (and
   the same LoRA init where the shapes agree), so seed-to-seed luck that hits both alike cancels in the
   per-seed difference d_i = a_i - b_i. The verdict is on those n differences, never on two separate spreads.
2. A Student-t interval for the mean difference: mean(d) ± t_{1-(1-c)/2, n-1} · sd(d) / sqrt(n), and the
   two-sided p-value of "no difference". At least MIN_SEEDS pairs: with fewer, the interval is too wide to
   say anything and a verdict is refused (TooFewSeedsError).
3. Several calls in one table: Holm's step-down adjustment of the p-values (Holm 1979), which keeps the chance
   of calling *any* of the table's differences real when none is at most 1 - confidence.
4. One sentence per call, computed from the numbers (verdict_sentence).

The t distribution is computed here (no scipy): its cdf through the regularized incomplete beta function,
evaluated by its continued fraction; its quantile by bisection on the cdf.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from functools import lru_cache

MIN_SEEDS = 5  # fewer paired seeds give no verdict: the t quantile at 3 pairs is 4.3, at 5 pairs 2.78


class TooFewSeedsError(ValueError):
    """A verdict asked of fewer than MIN_SEEDS paired results."""


# ----------------------------------------------------------------------------------------------
# The t distribution


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for a, b > 0 and 0 <= x <= 1.

    The continued fraction converges fast for x < (a + 1) / (a + b + 2); beyond that the symmetry
    I_x(a, b) = 1 - I_{1-x}(b, a) moves x to where it does."""
    if not (a > 0 and b > 0):
        raise ValueError(f"regularized_beta needs a > 0 and b > 0, got a={a!r}, b={b!r}.")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"regularized_beta needs 0 <= x <= 1, got x={x!r}.")
    if x == 0.0 or x == 1.0:
        return x
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_beta(b, a, 1.0 - x)
    # x^a (1-x)^b / (a B(a, b)), in logs so large a and b do not overflow
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    return math.exp(log_front) / a * _beta_fraction(a, b, x)


def _beta_fraction(a: float, b: float, x: float) -> float:
    # 1 / (1 + d1 / (1 + d2 / (1 + ...))) with d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m)) and
    # d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1)), evaluated front to back (modified Lentz):
    # each step multiplies the running value by a factor that tends to 1; `tiny` keeps a zero denominator off.
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    value = d
    for m in range(1, 10_000):
        for coeff in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + coeff * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + coeff / c
            c = c if abs(c) > tiny else tiny
            step = c * d
            value *= step
        if abs(step - 1.0) < eps:
            return value
    raise ArithmeticError(f"the incomplete beta fraction did not converge for a={a}, b={b}, x={x}")


def _check_df(df) -> float:
    if isinstance(df, bool) or not isinstance(df, (int, float)) or not 0 < df < math.inf:
        raise ValueError(f"degrees of freedom must be a positive number, got {df!r}.")
    return float(df)


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for T ~ Student t with df degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2)."""
    df = _check_df(df)
    if math.isnan(t):
        raise ValueError("t is NaN.")
    if math.isinf(t):
        return 0.0
    return regularized_beta(df / 2.0, 0.5, df / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for T ~ Student t with df degrees of freedom."""
    tail = t_two_sided_p(t, df) / 2.0  # P(T >= |t|)
    return 1.0 - tail if t > 0 else tail


@lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (0 < p < 1), by bisection on t_cdf to the last bits of a float."""
    df = _check_df(df)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p < 1.0:
        raise ValueError(f"a quantile needs 0 < p < 1, got {p!r}.")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    target = 2.0 * (1.0 - p)  # the two-sided tail at the answer; comparing tails keeps precision near p = 1
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > target:  # widen until the answer is bracketed (df = 1 has heavy tails)
        lo, hi = hi, hi * 2.0
        if hi > 1e300:
            raise ArithmeticError(f"t_quantile({p}, {df}) is beyond the range of a float")
    for _ in range(400):
        mid = (lo + hi) / 2.0
        if mid in (lo, hi):
            break
        if t_two_sided_p(mid, df) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


# ----------------------------------------------------------------------------------------------
# Paired differences and the multiple-comparison rule


@dataclass(frozen=True)
class PairedDifference:
    """mean(a - b) over n paired seeds, its t interval at `confidence`, and the two-sided p-value of no difference."""

    mean: float
    low: float
    high: float
    p_value: float
    n: int
    confidence: float
    sd: float  # sample standard deviation (n - 1) of the per-seed differences

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _check_confidence(confidence) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be a number between 0 and 1 (e.g. 0.95), got {confidence!r}.")
    return float(confidence)


def _numbers(values, name: str) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of numbers, got {values!r:.80}.") from None
    if any(isinstance(v, bool) for v in values) or not all(map(math.isfinite, out)):
        raise ValueError(f"{name} must be finite numbers (a diverged run has no place in a verdict), got {out}.")
    return out


def paired_difference(a, b, confidence: float = 0.95) -> PairedDifference:
    """The verdict's numbers for a[i] - b[i], where a[i] and b[i] are two methods' results with seed i.

    Refused (TooFewSeedsError) below MIN_SEEDS pairs. When every difference is the same number the spread is
    zero and t is undefined: the interval is that number, and p is 1 if it is 0 (identical results) else 0."""
    confidence = _check_confidence(confidence)
    a, b = _numbers(a, "a"), _numbers(b, "b")
    if len(a) != len(b):
        raise ValueError(f"paired results need one value per seed on each side, got {len(a)} and {len(b)}.")
    n = len(a)
    if n < MIN_SEEDS:
        raise TooFewSeedsError(
            f"{n} paired seed(s) give no verdict: at least MIN_SEEDS = {MIN_SEEDS} are needed (with fewer, a "
            "95% interval is too wide to tell a real difference from seed luck). Run more seeds."
        )
    diffs = [x - y for x, y in zip(a, b)]
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    if sd == 0.0:
        return PairedDifference(mean, mean, mean, 1.0 if mean == 0.0 else 0.0, n, confidence, 0.0)
    se = sd / math.sqrt(n)
    half = t_quantile(1.0 - (1.0 - confidence) / 2.0, n - 1) * se
    return PairedDifference(mean, mean - half, mean + half, t_two_sided_p(mean / se, n - 1), n, confidence, sd)


def holm_adjust(p_values) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given.

    Sorted ascending, the j-th smallest (j = 0, 1, ...) of m p-values is multiplied by m - j, capped at 1, and
    made no smaller than the adjusted value before it. Calling "real" every adjusted p below 1 - confidence
    keeps the chance of any false call in the family at most 1 - confidence, whatever the dependence."""
    ps = _numbers(p_values, "p_values")
    if any(not 0.0 <= p <= 1.0 for p in ps):
        raise ValueError(f"p-values lie between 0 and 1, got {ps}.")
    m = len(ps)
    adjusted = [0.0] * m
    running = 0.0
    for j, i in enumerate(sorted(range(m), key=lambda i: ps[i])):
        running = max(running, min(1.0, (m - j) * ps[i]))
        adjusted[i] = running
    return adjusted


# ----------------------------------------------------------------------------------------------
# Verdicts in words


def format_p(p: float) -> str:
    """A p-value with two significant digits ("0.02", "0.41", "0.0004"), "1" for 1."""
    return "1" if p >= 1.0 else f"{p:.2g}"


def chance_phrase(p: float) -> str:
    """p as a frequency: "about 2 times in 100", "about 4 times in 10,000", "less than once in 10,000"."""
    for scale in (100, 1_000, 10_000):
        count = round(p * scale)
        if count >= 1:
            return f"about {count:,} time{'s' if count != 1 else ''} in {scale:,}"
    return "less than once in 10,000"


def verdict_sentence(
    name_a: str,
    name_b: str,
    diff: PairedDifference,
    adjusted_p: float | None = None,
    *,
    adjustment: str = "Holm",
    digits: int = 3,
) -> str:
    """One sentence on diff = paired_difference(a, b): which is lower and by how much, the interval in that
    direction, the number of paired seeds, and the (adjusted) p-value read as a frequency.

    The call is "real" when the p-value (adjusted_p, if given: the table's Holm-adjusted value) is below
    1 - diff.confidence; the sentence then starts with the direction, otherwise with "no detectable difference"."""
    if not isinstance(diff, PairedDifference):
        raise TypeError(f"diff must be a PairedDifference (from paired_difference), got {type(diff).__name__}.")
    p = diff.p_value if adjusted_p is None else float(adjusted_p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"adjusted_p must lie between 0 and 1, got {adjusted_p!r}.")
    level = f"{diff.confidence * 100:g}%"
    seeds = f"{diff.n} paired seeds"
    if diff.sd == 0.0 and diff.mean == 0.0:
        return f"{name_a} and {name_b} gave identical results with each of the {seeds}: no difference to judge."
    lower = diff.mean < 0
    size, low, high = (-diff.mean, -diff.high, -diff.low) if lower else (diff.mean, diff.low, diff.high)
    direction = f"{name_a} is {'lower' if lower else 'higher'} than {name_b} by {size:.{digits}f}"
    interval = f"{level} CI {low:.{digits}f} to {high:.{digits}f}"
    label = f"{adjustment}-adjusted p" if adjusted_p is not None else "p"
    chance = f"{label} = {format_p(p)}: a difference this large would arise by chance {chance_phrase(p)}"
    if p < 1.0 - diff.confidence:
        return f"{direction} ({interval}, {seeds}; {chance})."
    return f"No detectable difference between {name_a} and {name_b}: {direction} ({interval}, {seeds}; {chance})."


def is_real(diff: PairedDifference, adjusted_p: float | None = None) -> bool:
    """The call verdict_sentence makes: the (adjusted) p-value is below 1 - confidence."""
    return (diff.p_value if adjusted_p is None else adjusted_p) < 1.0 - diff.confidence


@dataclass(frozen=True)
class Verdict:
    name: str
    reference: str
    diff: PairedDifference  # of name - reference
    adjusted_p: float
    real: bool
    sentence: str

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "reference": self.reference,
            "difference": self.diff.to_dict(),
            "adjusted_p": self.adjusted_p,
            "real": self.real,
            "sentence": self.sentence,
        }


def verdicts_against(values: dict[str, list[float]], reference: str, confidence: float = 0.95) -> list[Verdict]:
    """Every other entry of `values` (name -> one result per paired seed) against values[reference], with the
    p-values Holm-adjusted across these calls: one Verdict (and sentence) per call, in the order of `values`."""
    if reference not in values:
        raise ValueError(f"reference {reference!r} is not among the results {list(values)}.")
    others = [name for name in values if name != reference]
    diffs = [paired_difference(values[name], values[reference], confidence) for name in others]
    adjusted = holm_adjust([d.p_value for d in diffs])
    return [
        Verdict(name, reference, d, p, is_real(d, p), verdict_sentence(name, reference, d, p))
        for name, d, p in zip(others, diffs, adjusted)
    ]
