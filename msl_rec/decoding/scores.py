"""Full-catalog ranking from a model's item scores (the sequential recommenders' decoder, ``decoder=item_scores``).

A model that scores every item (SASRec, BERT4Rec: ``model(history, lengths) -> (B, num_items)``) needs no
search: every catalog entry is scored and the best ``num_results`` kept. Entries are the catalog's title groups
(items sharing a title are one entry, scored by their best item), the list an LLM decoder ranks too.

Each user is scored on its own (a forward of one row): a user's scores, and so its ranking, are then a
function of its own history only, never of the batch size or the other users (a batched matrix product may
sum in another order for another batch shape, which can swap near-ties).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from msl_rec.decoding.base import Decoder, Ranking


class ItemScoreRanker(Decoder):
    """Rank every catalog entry by the model's score, best first; ties go to the smaller entry index.

    Args:
        catalog: a catalog with ``item_group`` (model index -> entry) and ``seq_items``
            (:class:`~msl_rec.data.sequences.TitleCatalog`).
        num_results: entries returned per user (default ``max(top_k)``).
    """

    needs_model = True
    uses_lm = False
    compute_dtype = "float32"  # scores are compared in float32 (the model's weights are float32)

    def __init__(self, catalog, num_results: int | None = None, top_k: Sequence[int] = (1, 5, 10)):
        if not hasattr(catalog, "item_group"):
            raise ValueError("decoder=item_scores ranks a sequential model's item scores; it needs a sequential "
                             "method (method=sasrec|bert4rec), not an LLM's catalog (use decoder=cbs_masked)")
        self.top_k = tuple(int(k) for k in top_k)
        self.num_results = int(num_results or max(self.top_k))
        self.item_group = torch.as_tensor(catalog.item_group)
        self.num_groups = len(catalog.seq_items)

    @torch.no_grad()
    def group_scores(self, model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, num_groups) float32: each entry's best item score, every user scored on its own."""
        rows = [model(batch["history"][b: b + 1], batch["lengths"][b: b + 1]).float()
                for b in range(len(batch["lengths"]))]
        scores = torch.cat(rows).cpu()
        out = scores.new_full((scores.shape[0], self.num_groups), float("-inf"))
        return out.scatter_reduce(1, self.item_group.expand_as(scores), scores, reduce="amax")

    def rank(self, model, batch: Mapping[str, torch.Tensor]) -> list[Ranking]:
        if model is None:
            raise ValueError("decoder=item_scores needs the trained model, got None")
        scores = self.group_scores(model, batch)
        if not torch.isfinite(scores).all():
            bad = int((~torch.isfinite(scores)).any(1).nonzero()[0, 0])
            raise FloatingPointError(f"user {int(batch['user_ids'][bad])}: the model's item scores are not finite "
                                     "(NaN/inf weights?); nothing is ranked")
        n = min(self.num_results, self.num_groups)
        # descending and stable: equal scores keep the smaller entry index first
        values, order = torch.sort(scores, dim=1, descending=True, stable=True)
        return [list(zip(o[:n].tolist(), v[:n].tolist())) for o, v in zip(order, values)]
