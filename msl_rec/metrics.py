"""Ranking metrics: NDCG@K and HR@K from the 0-based rank of each user's target.

A rank ``r`` counts from 0 (the first recommendation); ``-1`` means the target was not ranked.
``NDCG@K = 1 / log2(r + 2)`` if ``0 <= r < K`` else 0 (one relevant item, so IDCG = 1), and
``HR@K = 1`` if ``0 <= r < K`` else 0.

Duplicate titles: a recommendation is a token sequence, and several catalog items can share one
(Books has 9 duplicate-title pairs). A ranked sequence is a hit if the target id is *any* of the
items carrying it, so :func:`rank_of_target` takes the item-id set of each ranked sequence.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def rank_of_target(target_id: int, ranked_item_sets: Sequence[Iterable[int]]) -> int:
    """0-based position of the first ranked entry whose item set contains ``target_id``; -1 if none."""
    target = int(target_id)
    for r, items in enumerate(ranked_item_sets):
        if target in items:
            return r
    return -1


def _ranks(ranks) -> np.ndarray:
    r = np.asarray(ranks, dtype=np.int64).reshape(-1)
    if r.size == 0:  # a mean over no users is undefined, and 0.0 would read as a real result
        raise ValueError("no users to compute metrics over (n=0)")
    return r


def ndcg_at_k(ranks, k: int) -> float:
    """Mean NDCG@k over users given their 0-based target ranks (-1 = missed); no users: ValueError."""
    r = _ranks(ranks)
    hit = (r >= 0) & (r < k)
    gains = np.where(hit, 1.0 / np.log2(np.where(hit, r, 0) + 2.0), 0.0)
    return float(gains.mean())


def hit_rate_at_k(ranks, k: int) -> float:
    """Mean HR@k (fraction of users whose target is in the top k); no users: ValueError."""
    r = _ranks(ranks)
    return float(((r >= 0) & (r < k)).mean())


def compute_metrics(ranks, ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
    """``{"ndcg@k": ..., "hr@k": ...}`` for every k in ``ks`` (NDCG keys first)."""
    ks = [int(k) for k in ks]
    out = {f"ndcg@{k}": ndcg_at_k(ranks, k) for k in ks}
    out.update({f"hr@{k}": hit_rate_at_k(ranks, k) for k in ks})
    return out
