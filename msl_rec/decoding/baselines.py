"""Model-free rankers: most popular training targets, and a seeded random ranking."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from msl_rec.decoding.base import Decoder, Ranking


class PopularityRanker(Decoder):
    """Recommends the same sequences to everyone: the most frequent training targets.

    A sequence's count is the sum of its items' counts (duplicate titles share a sequence, and a
    recommendation of it is a hit for either item); ties go to the smaller item id. The score is
    the count.

    Args:
        catalog: the item catalog.
        train_targets: the target item id of every training sample.
        num_results: sequences returned per user (defaults to ``max(top_k)``).
    """

    needs_model = False

    def __init__(self, catalog, train_targets: Iterable[int], num_results: int | None = None,
                 top_k: Sequence[int] = (1, 5, 10)):
        self.top_k = tuple(int(k) for k in top_k)
        self.num_results = int(num_results or max(self.top_k))
        counts = Counter(int(t) for t in train_targets)
        unknown = [t for t in counts if t not in catalog.item_seq]
        if unknown:
            raise ValueError(f"train_targets: item ids not in the catalog: {sorted(unknown)[:5]}")
        seq_count = Counter()
        for item, c in counts.items():
            seq_count[catalog.item_seq[item]] += c
        order = sorted(range(len(catalog.seq_items)),
                       key=lambda s: (-seq_count.get(s, 0), min(catalog.seq_items[s])))
        self.ranking: Ranking = [(s, float(seq_count.get(s, 0))) for s in order[: self.num_results]]

    def rank(self, model, batch: Mapping[str, torch.Tensor]) -> list[Ranking]:
        return [list(self.ranking) for _ in range(len(batch["target_ids"]))]


class RandomRanker(Decoder):
    """A uniformly random ranking of distinct sequences per user.

    The generator is seeded with ``(seed, user_id)``, so a user's ranking does not depend on the
    batch or the order of evaluation. Scores are ``-position``.
    """

    needs_model = False

    def __init__(self, catalog, seed: int = 0, num_results: int | None = None,
                 top_k: Sequence[int] = (1, 5, 10)):
        self.top_k = tuple(int(k) for k in top_k)
        self.num_results = int(num_results or max(self.top_k))
        self.num_sequences = len(catalog.seq_items)
        self.seed = int(seed)

    def rank(self, model, batch: Mapping[str, torch.Tensor]) -> list[Ranking]:
        n = min(self.num_results, self.num_sequences)
        out = []
        for user in batch["user_ids"].tolist():
            picks = np.random.default_rng([self.seed, int(user)]).choice(self.num_sequences, size=n, replace=False)
            out.append([(int(s), -float(r)) for r, s in enumerate(picks)])
        return out
