"""Is one recommender better than another on the same users? Paired differences, a bootstrap
interval, a permutation test and the minimum detectable effect.

Inputs are per-user values (a user's NDCG@10, HR@10 or ``target_logp``) of a model and of a
baseline as arrays of shape ``(seeds, users)``: one row per training seed, columns the same users
in the same order. A user's paired difference is the model's value minus the baseline's, each
averaged over its seeds.

- **Interval**: a two-level percentile bootstrap. Each replicate resamples the model's seeds and the
  baseline's seeds (with replacement, when there are several), then the users, and takes the mean
  difference; seeds first because a new seed is a new model, users second because they are the
  sample the metric averages over. With one seed each it is the usual paired bootstrap over users
  (``scipy.stats.bootstrap(..., paired=True, method="percentile")`` gives the same interval; the
  tests check it). scipy has no two-level bootstrap, hence this one.
- **Test**: a paired sign-flip permutation test of the mean difference (``scipy.stats.permutation_test``
  with ``permutation_type="samples"``: each user's two values are swapped at random). It tests the
  statistic the tables report (mean NDCG, a mean of mostly-zero per-user gains) without assuming
  a distribution, and users with equal values (most of them) count for nothing, as they should.
  The Wilcoxon signed-rank test would drop those zeros and test a median-like shift instead, and
  its normal approximation is poor with many ties.
- **Minimum detectable effect**: ``(z_{1-alpha/2} + z_{power}) * sd / sqrt(n)`` (2.80 * sd / sqrt(n)
  at alpha 0.05, power 0.8), with ``sd`` the standard deviation of the paired differences. It is
  computed from this run's own differences, so it says what a run of this size and noise could
  have told apart, not what any run would.

The verdict is "no detectable difference" whenever the interval covers 0 or the test's p-value is not below
``1 - confidence``. The two disagree when only a handful of users differ (a few hits among hundreds of users):
the percentile bootstrap then excludes 0 while the exact sign-flip test cannot (5 users all in one direction
give p = 1/16), and a table must not call that a difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

NO_DIFFERENCE = "no detectable difference"


@dataclass(frozen=True)
class PairedComparison:
    """One metric of a model against a baseline on the same users.

    Attributes:
        metric: the per-user value compared (``ndcg@10``, ``hr@10``, ``target_logp``).
        n_users: users both were evaluated on.
        n_seeds: (model seeds, baseline seeds).
        model_mean, base_mean: means over users (and seeds).
        diff: ``model_mean - base_mean``.
        ci_low, ci_high: the bootstrap interval for ``diff`` at ``confidence``.
        p_value: two-sided p-value of the paired sign-flip test on the seed-averaged differences.
        mde: minimum detectable effect (absolute, in the metric's units).
        sd: standard deviation of the per-user paired differences.
    """

    metric: str
    n_users: int
    n_seeds: tuple[int, int]
    model_mean: float
    base_mean: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    mde: float
    sd: float
    confidence: float = 0.95

    @property
    def detectable(self) -> bool:
        """The interval excludes 0 and the test agrees at the same level (see the module docstring)."""
        return not (self.ci_low <= 0.0 <= self.ci_high) and self.p_value < 1 - self.confidence

    @property
    def verdict(self) -> str:
        if not self.detectable:
            return NO_DIFFERENCE
        return "model higher" if self.diff > 0 else "model lower"


def _as_seed_user(values, name: str) -> np.ndarray:
    a = np.asarray(values, dtype=float)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name}: expected per-user values of shape (seeds, users), got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: non-finite per-user values (NaN or inf)")
    return a


def bootstrap_ci(model, base, confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0,
                 chunk: int = 500) -> tuple[float, float]:
    """Percentile interval of the mean paired difference: resample seeds, then users.

    Args:
        model, base: per-user values, shape ``(seeds, users)`` (or ``(users,)`` for one seed).
    """
    a, b = _as_seed_user(model, "model"), _as_seed_user(base, "base")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"model has {a.shape[1]} users, base {b.shape[1]}: compare the same users")
    rng = np.random.default_rng(seed)
    n = a.shape[1]
    reps = []
    for start in range(0, n_resamples, chunk):
        m = min(chunk, n_resamples - start)
        # seed level: a replicate's per-user values are the mean over its drawn seeds
        da = a[rng.integers(0, a.shape[0], size=(m, a.shape[0]))].mean(axis=1) if a.shape[0] > 1 else \
            np.broadcast_to(a[0], (m, n))
        db = b[rng.integers(0, b.shape[0], size=(m, b.shape[0]))].mean(axis=1) if b.shape[0] > 1 else \
            np.broadcast_to(b[0], (m, n))
        users = rng.integers(0, n, size=(m, n))  # user level: the same users for both sides (paired)
        reps.append(np.take_along_axis(da - db, users, axis=1).mean(axis=1))
    reps = np.concatenate(reps)
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(reps, [tail, 100 - tail])
    return float(lo), float(hi)


def sign_flip_test(model, base, n_resamples: int = 9_999, seed: int = 0) -> float:
    """Two-sided p-value of the paired permutation test of ``mean(model - base)`` (1-D, per user).

    Exact (every sign pattern) when ``2**n_nonzero <= n_resamples``, Monte Carlo otherwise. Users
    whose two values are equal flip to themselves, so they are left out (same null distribution).
    """
    x, y = np.asarray(model, dtype=float), np.asarray(base, dtype=float)
    keep = x != y
    x, y = x[keep], y[keep]
    if x.size <= 1:  # one differing user: its two sign patterns are equally extreme (scipy needs two)
        return 1.0
    res = stats.permutation_test((x, y), lambda u, v, axis: np.mean(u - v, axis=axis), vectorized=True,
                                 permutation_type="samples", alternative="two-sided",
                                 n_resamples=n_resamples, batch=max(1, 2_000_000 // x.size),
                                 random_state=np.random.default_rng(seed))
    return float(res.pvalue)


def minimum_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean difference a two-sided paired test at ``alpha`` finds with ``power``."""
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return float(z * sd / math.sqrt(n))


def compare_paired(model, base, metric: str, confidence: float = 0.95, n_resamples: int = 10_000,
                   seed: int = 0) -> PairedComparison:
    """All of the above for one metric; ``model``/``base`` as in :func:`bootstrap_ci`."""
    a, b = _as_seed_user(model, f"{metric} (model)"), _as_seed_user(base, f"{metric} (base)")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{metric}: model has {a.shape[1]} users, base {b.shape[1]}: compare the same users")
    ma, mb = a.mean(axis=0), b.mean(axis=0)
    d = ma - mb
    n = d.size
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    lo, hi = bootstrap_ci(a, b, confidence=confidence, n_resamples=n_resamples, seed=seed)
    return PairedComparison(metric=metric, n_users=n, n_seeds=(a.shape[0], b.shape[0]),
                            model_mean=float(ma.mean()), base_mean=float(mb.mean()), diff=float(d.mean()),
                            ci_low=lo, ci_high=hi, p_value=sign_flip_test(ma, mb, seed=seed),
                            mde=minimum_detectable_effect(sd, n), sd=sd, confidence=confidence)
