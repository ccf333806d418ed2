"""experiments.stats: the t distribution against known values, and the verdict rule on synthetic results whose
answer is known (identical methods are called different at the stated rate; intervals cover the truth)."""

import math
import random

import pytest

from lora_lab.experiments.stats import (
    MIN_SEEDS,
    PairedDifference,
    TooFewSeedsError,
    chance_phrase,
    holm_adjust,
    is_real,
    paired_difference,
    regularized_beta,
    t_cdf,
    t_quantile,
    verdict_sentence,
    verdicts_against,
)

DRAWS = 10_000


def margin(rate: float, draws: int = DRAWS) -> float:
    """Four binomial standard deviations of a rate measured over `draws` simulated draws: a right rule falls
    outside it about once in 16,000 seeds, a wrong one (a normal quantile for a t one: ~12% at 5 seeds) never."""
    return 4 * math.sqrt(rate * (1 - rate) / draws)


@pytest.mark.parametrize(
    "p, df, expected",
    [
        (0.975, 4, 2.7764),  # the textbook table
        (0.975, 2, 4.3027),
        (0.995, 9, 3.2498),
        (0.95, 30, 1.6973),
        (0.975, 10_000, 1.9602),  # tends to the normal's 1.95996
        (0.025, 4, -2.7764),  # symmetry
    ],
)
def test_t_quantile_matches_the_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-4)


def test_df_1_is_the_cauchy_closed_form_and_df_2_its_own():
    for t in (-30.0, -2.0, -0.3, 0.0, 0.7, 5.0, 1e4):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)
    for p in (0.6, 0.9, 0.975, 0.999):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)


def test_quantile_inverts_the_cdf_and_the_incomplete_beta_is_right():
    for df in (1, 3, 4.5, 12, 200):
        for p in (0.001, 0.2, 0.5, 0.8, 0.9999):
            assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)
    assert regularized_beta(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)  # 1 - (1-x)^3 (1 + 3x) at x = 0.4
    assert regularized_beta(1, 1, 0.37) == pytest.approx(0.37, abs=1e-14)  # uniform
    with pytest.raises(ValueError, match="0 < p < 1"):
        t_quantile(1.0, 4)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_cdf(1.0, 0)


def test_a_paired_difference_by_hand():
    d = paired_difference([1.0, 2.0, 3.0, 4.0, 5.5], [0.9, 1.8, 3.1, 3.7, 5.0])
    diffs = [0.1, 0.2, -0.1, 0.3, 0.5]
    mean, sd = sum(diffs) / 5, math.sqrt(sum((x - 0.2) ** 2 for x in diffs) / 4)
    half = 2.776445105 * sd / math.sqrt(5)
    assert (d.mean, d.sd, d.n) == (pytest.approx(mean), pytest.approx(sd), 5)
    assert (d.low, d.high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert d.p_value == pytest.approx(2 * (1 - t_cdf(mean / (sd / math.sqrt(5)), 4)))
    assert not is_real(d)  # the interval holds 0
    same = paired_difference([1.0] * 5, [1.0] * 5)
    assert (same.mean, same.p_value, same.low, same.high) == (0.0, 1.0, 0.0, 0.0)


def test_fewer_than_min_seeds_and_bad_input_are_refused():
    with pytest.raises(TooFewSeedsError, match="at least MIN_SEEDS = 5"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.5, 3.0])
    assert MIN_SEEDS == 5
    with pytest.raises(ValueError, match="one value per seed on each side"):
        paired_difference([1.0] * 5, [1.0] * 6)
    with pytest.raises(ValueError, match="finite numbers"):
        paired_difference([1.0, 2.0, math.nan, 1.0, 1.0], [1.0] * 5)
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([1.0] * 5, [2.0] * 5, confidence=95)


def test_holm_on_a_known_example():
    # Sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> raised to 0.06 (monotone).
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm_adjust([0.02]) == [0.02]  # one call: nothing to adjust
    with pytest.raises(ValueError, match="between 0 and 1"):
        holm_adjust([0.2, 1.5])


def simulated(n, shift, rng, seed_sd=1.0, noise_sd=0.3):
    """Two methods' results over n paired seeds: a shared seed effect plus each method's own noise."""
    seed_effect = [rng.gauss(0.0, seed_sd) for _ in range(n)]
    a = [s + shift + rng.gauss(0.0, noise_sd) for s in seed_effect]
    b = [s + rng.gauss(0.0, noise_sd) for s in seed_effect]
    return a, b


def test_identical_methods_are_called_different_at_the_stated_rate():
    rng = random.Random(18)
    calls = [is_real(paired_difference(*simulated(MIN_SEEDS, 0.0, rng))) for _ in range(DRAWS)]
    assert abs(sum(calls) / DRAWS - 0.05) < margin(0.05)
    calls99 = [is_real(paired_difference(*simulated(MIN_SEEDS, 0.0, rng), 0.99)) for _ in range(DRAWS)]
    assert abs(sum(calls99) / DRAWS - 0.01) < margin(0.01)


def test_intervals_cover_the_true_difference_at_their_level():
    rng = random.Random(22)
    true = 0.25
    covered = 0
    for _ in range(DRAWS):
        d = paired_difference(*simulated(7, true, rng))
        covered += d.low <= true <= d.high
    assert abs(covered / DRAWS - 0.95) < margin(0.95)


def test_holm_keeps_the_tables_false_call_rate_and_a_real_difference_is_found():
    # Four methods identical to the reference: without adjustment some call is "real" in ~1 - 0.95^4 = 19%
    # of tables; with Holm in at most 5%.
    rng = random.Random(5)
    raw_any = holm_any = 0
    tables = 2_000
    for _ in range(tables):
        ref = [rng.gauss(0.0, 1.0) for _ in range(MIN_SEEDS)]
        values = {"ref": ref, **{f"m{i}": [r + rng.gauss(0.0, 0.3) for r in ref] for i in range(4)}}
        # the reference gets its own noise too, as a fifth identical method
        values["ref"] = [r + rng.gauss(0.0, 0.3) for r in ref]
        found = verdicts_against(values, "ref")
        raw_any += any(is_real(v.diff) for v in found)
        holm_any += any(v.real for v in found)
    assert raw_any / tables > 0.12  # the problem Holm solves is there
    assert holm_any / tables < 0.05 + margin(0.05, tables)
    # power: a shift of 3 noise-sds of a difference is found nearly always with 5 seeds
    found = [is_real(paired_difference(*simulated(MIN_SEEDS, 1.3, rng))) for _ in range(200)]
    assert sum(found) / 200 > 0.9


def test_the_sentence_is_computed_from_the_numbers():
    d = PairedDifference(-0.031, -0.050, -0.012, 0.004, 5, 0.95, 0.015)
    assert verdict_sentence("LoRA", "full", d, 0.02) == (
        "LoRA is lower than full by 0.031 (95% CI 0.012 to 0.050, 5 paired seeds; Holm-adjusted p = 0.02: "
        "a difference this large would arise by chance about 2 times in 100)."
    )
    weak = PairedDifference(0.004, -0.010, 0.018, 0.41, 6, 0.95, 0.01)
    text = verdict_sentence("dora", "LoRA", weak)
    assert text.startswith("No detectable difference between dora and LoRA: dora is higher than LoRA by 0.004")
    assert "6 paired seeds; p = 0.41: a difference this large would arise by chance about 41 times in 100" in text
    assert chance_phrase(0.0004) == "about 4 times in 10,000" and chance_phrase(1e-7) == "less than once in 10,000"
    same = paired_difference([2.0] * 5, [2.0] * 5)
    assert "identical results" in verdict_sentence("a", "b", same)
    with pytest.raises(ValueError, match="reference 'x' is not among"):
        verdicts_against({"a": [1.0] * 5}, "x")
