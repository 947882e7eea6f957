"""LML: the ordinary language-modelling loss over the response tokens (the BIGRec baseline)."""

from __future__ import annotations

import torch

from msl_rec.losses.base import RecLoss, ResponseBatch
from msl_rec.losses.functional import lml_loss, valid_probability


class LMLLoss(RecLoss):
    """Cross-entropy over the full vocabulary at the response positions only.

    Args:
        tau: softmax temperature (1.0 = plain LML).

    Metrics: ``loss``; when the batch carries ``valid_ids`` also ``valid_size`` (mean size of the
    valid set) and ``w_mean``: the mean over positions with more than one valid token of
    ``w = 1 - sum_{z valid} softmax(logits / tau)_z``, the probability mass (hence gradient share)
    spent on tokens the trie can never emit (Fig. 5), computed from the same logits without grad.
    """

    def __init__(self, tau: float = 1.0):
        super().__init__()
        self.tau = float(tau)

    def forward(self, batch: ResponseBatch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = batch.hidden @ batch.weight.T
        loss = lml_loss(logits, batch.labels, self.tau)
        metrics = {"loss": loss.item()}
        if batch.valid_ids is not None:
            metrics.update(valid_metrics(logits, batch.valid_ids, self.tau))
        return loss, metrics


def valid_metrics(logits: torch.Tensor, valid_ids: torch.Tensor, tau: float) -> dict[str, float]:
    """``valid_size`` and ``w_mean`` (see :class:`LMLLoss`) from full-vocabulary logits (N, V)."""
    sizes = (valid_ids >= 0).sum(1)
    multi = sizes > 1
    w = 1.0 - valid_probability(logits.detach(), valid_ids, tau)
    w_mean = (w[multi].mean() if multi.any() else w.new_zeros(())).item()
    return {"valid_size": sizes.float().mean().item(), "w_mean": w_mean}
