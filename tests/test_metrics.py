import math

import numpy as np
import pytest

from msl_rec.metrics import compute_metrics, hit_rate_at_k, ndcg_at_k, rank_of_target


def test_rank_of_target_counts_duplicate_titles_as_hits():
    ranked = [(5,), (7, 9), (3,)]  # (7, 9): two items sharing one title
    assert rank_of_target(5, ranked) == 0
    assert rank_of_target(9, ranked) == 1
    assert rank_of_target(7, ranked) == 1
    assert rank_of_target(4, ranked) == -1
    assert rank_of_target(3, []) == -1


def test_hand_computed_values():
    ranks = np.array([0, 1, 4, 9, -1])
    assert ndcg_at_k(ranks, 1) == pytest.approx(1 / 5)
    assert hit_rate_at_k(ranks, 1) == pytest.approx(1 / 5)
    ndcg5 = (1 + 1 / math.log2(3) + 1 / math.log2(6)) / 5
    assert ndcg_at_k(ranks, 5) == pytest.approx(ndcg5)
    assert hit_rate_at_k(ranks, 5) == pytest.approx(3 / 5)
    assert ndcg_at_k(ranks, 10) == pytest.approx(ndcg5 + 1 / math.log2(11) / 5)
    assert hit_rate_at_k(ranks, 10) == pytest.approx(4 / 5)
    m = compute_metrics(ranks, (1, 5, 10))
    assert list(m) == ["ndcg@1", "ndcg@5", "ndcg@10", "hr@1", "hr@5", "hr@10"]
    assert m["ndcg@5"] == pytest.approx(ndcg5)


def test_empty_and_all_missed():
    # no users is an error (it used to be all zeros, indistinguishable from a useless model)
    for fn in (lambda: compute_metrics([], (1,)), lambda: ndcg_at_k([], 1), lambda: hit_rate_at_k([], 1)):
        with pytest.raises(ValueError, match="n=0"):
            fn()
    assert ndcg_at_k([-1, -1], 10) == 0.0
