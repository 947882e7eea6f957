"""Paired comparison statistics against known truths, scipy and brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from msl_rec.significance import (
    NO_DIFFERENCE,
    bootstrap_ci,
    compare_paired,
    minimum_detectable_effect,
    sign_flip_test,
)


def test_bootstrap_interval_covers_a_known_difference():
    # 200 synthetic paired data sets with a true mean difference of 0.05: a 95% interval should
    # cover it about 95% of the time (binomial sd over 200 sets: 1.5 points)
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(200):
        base = rng.normal(0.3, 0.2, size=300)
        model = base + 0.05 + rng.normal(0, 0.1, size=300)
        lo, hi = bootstrap_ci(model, base, n_resamples=1000, seed=int(rng.integers(1 << 30)))
        covered += lo <= 0.05 <= hi
    assert 0.90 <= covered / 200 <= 0.99, covered


def test_bootstrap_one_seed_matches_scipy_paired_percentile():
    rng = np.random.default_rng(1)
    base = (rng.random(400) < 0.1).astype(float)
    model = (rng.random(400) < 0.15).astype(float)
    lo, hi = bootstrap_ci(model, base, n_resamples=20_000, seed=3)
    ref = stats.bootstrap((model, base), lambda x, y, axis: np.mean(x - y, axis=axis), paired=True,
                          vectorized=True, method="percentile", n_resamples=20_000,
                          random_state=np.random.default_rng(4)).confidence_interval
    # the Monte Carlo error of a 2.5% quantile over 20,000 replicates is ~0.002 here
    assert lo == pytest.approx(ref.low, abs=0.006) and hi == pytest.approx(ref.high, abs=0.006)


def test_seed_resampling_widens_the_interval():
    # two model seeds, one 0.1 above the base on every user and one 0.1 below: their average equals
    # the base, so users alone give a zero-width interval; resampling seeds must show the spread
    base = np.linspace(0, 1, 200)
    model = np.stack([base + 0.1, base - 0.1])
    lo, hi = bootstrap_ci(model, base, n_resamples=4000)
    assert lo < -0.05 and hi > 0.05
    lo1, hi1 = bootstrap_ci(model.mean(axis=0), base, n_resamples=4000)
    assert lo1 == pytest.approx(0, abs=1e-12) and hi1 == pytest.approx(0, abs=1e-12)


def _ndcg10(ranks):
    r = np.asarray(ranks)
    return np.where((r >= 0) & (r < 10), 1 / np.log2(np.maximum(r, 0) + 2), 0.0)


def test_identical_rankings_report_no_detectable_difference():
    ranks = np.array([-1] * 90 + [0, 3, 9, 1, 2, -1, 5, 7, 8, 4])
    c = compare_paired(_ndcg10(ranks), _ndcg10(ranks), "ndcg@10")
    assert (c.diff, c.ci_low, c.ci_high, c.p_value, c.mde) == (0, 0, 0, 1.0, 0)
    assert c.verdict == NO_DIFFERENCE and not c.detectable


def test_noise_without_a_shift_reports_no_detectable_difference():
    # each model hits a different 10 of 500 users at the same ranks: equal means, differences of +-
    base_ranks = np.full(500, -1)
    model_ranks = np.full(500, -1)
    base_ranks[:10] = np.arange(10)
    model_ranks[10:20] = np.arange(10)
    c = compare_paired(_ndcg10(model_ranks), _ndcg10(base_ranks), "ndcg@10")
    assert c.diff == pytest.approx(0, abs=1e-15) and c.ci_low < 0 < c.ci_high and c.verdict == NO_DIFFERENCE
    assert c.p_value == pytest.approx(1.0, abs=0.02)
    # a real shift on the same users is found
    rng = np.random.default_rng(0)
    logp_base = rng.normal(-40, 5, 500)
    c2 = compare_paired(logp_base + 0.5 + rng.normal(0, 0.5, 500), logp_base, "target_logp")
    assert c2.verdict == "model higher" and c2.p_value < 0.001 and c2.ci_low < 0.5 < c2.ci_high


def test_a_few_differing_users_all_one_way_are_no_detectable_difference():
    # 4 of 500 users hit by the model only: the percentile bootstrap interval excludes 0 (a replicate
    # without any of the 4 has probability (496/500)**500 ~ 2%), but the exact sign-flip test cannot go below
    # 2 / 2**4 = 0.125; the verdict follows the weaker of the two
    model = np.zeros(500)
    model[:4] = 1.0
    c = compare_paired(model, np.zeros(500), "hr@10")
    assert c.ci_low > 0 and c.p_value == pytest.approx(0.125)
    assert not c.detectable and c.verdict == NO_DIFFERENCE
    # with 12 such users both agree
    model[:12] = 1.0
    c = compare_paired(model, np.zeros(500), "hr@10")
    assert c.ci_low > 0 and c.p_value < 0.05 and c.verdict == "model higher"


def test_sign_flip_test_equals_brute_force_enumeration():
    model = np.array([0.5, 0.0, 1.0, 0.3, 0.0, 0.63, 0.2, 0.0, 1.0, 0.43])
    base = np.array([0.0, 0.0, 0.63, 0.0, 0.5, 0.0, 0.2, 1.0, 0.0, 0.0])  # two equal pairs (zero differences)
    d = model - base
    observed = abs(d.mean())
    flips = [abs((np.array(s) * d).mean()) >= observed - 1e-12 for s in itertools.product([1, -1], repeat=d.size)]
    brute = np.mean(flips)
    assert sign_flip_test(model, base) == pytest.approx(brute, rel=1e-9)
    assert 0 < brute < 1


def test_minimum_detectable_effect_formula():
    # (z_0.975 + z_0.8) = 1.95996 + 0.84162 = 2.80158
    assert minimum_detectable_effect(0.3, 900) == pytest.approx(2.80158 * 0.3 / 30, rel=1e-5)
    c = compare_paired(np.array([1.0, 0, 0, 0.5]), np.zeros(4), "x", n_resamples=200)
    d = np.array([1.0, 0, 0, 0.5])
    assert c.sd == pytest.approx(d.std(ddof=1)) and c.mde == pytest.approx(2.80158 * d.std(ddof=1) / 2, rel=1e-5)


def test_bad_input_is_an_error():
    with pytest.raises(ValueError, match="same users"):
        compare_paired(np.zeros(3), np.zeros(4), "ndcg@10")
    with pytest.raises(ValueError, match="non-finite"):
        compare_paired(np.array([0.0, np.nan]), np.zeros(2), "target_logp")


def test_sign_flip_with_one_differing_user_is_p_one():
    # exact: the observed difference and its flip are equally extreme, so p = 1 (scipy raised here)
    from msl_rec.significance import sign_flip_test

    assert sign_flip_test([0.0, 0.5, 0.0], [0.0, 0.0, 0.0]) == 1.0
    assert sign_flip_test([1.0, 0.5, 0.25], [0.0, 0.0, 0.0]) == 0.25  # 3 users all up: 2 of 8 patterns as extreme
