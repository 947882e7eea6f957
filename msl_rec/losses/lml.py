"""LML: the ordinary language-modelling loss over the response tokens (the BIGRec baseline)."""

from __future__ import annotations

import torch

from msl_rec.losses.base import RecLoss, ResponseBatch, loss_setting
from msl_rec.losses.functional import lml_loss, positive_weight, valid_probability


class LMLLoss(RecLoss):
    """Cross-entropy over the full vocabulary at the response positions only.

    Args:
        tau: softmax temperature (1.0 = plain LML), > 0.

    Metrics (from the same logits, without grad): ``loss``, ``tau`` and ``w_mean``, the paper's w
    (Eq. 7, Fig. 5) ``1 - softmax(logits / tau)[y]`` at the positive token. When the batch carries
    ``valid_ids``: ``w_mean`` is averaged over the positions with more than one valid token (the
    positions MSL trains on, so the two losses' figures compare), and ``valid_size`` (mean valid-set
    size, all positions) and ``invalid_mass`` (mean over the same positions of the softmax mass on
    tokens outside the valid set) are added. Without ``valid_ids`` ``w_mean`` covers every position.
    """

    def __init__(self, tau: float = 1.0):
        super().__init__()
        self.tau = loss_setting("tau", tau, above=0)

    def forward(self, batch: ResponseBatch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = batch.hidden @ batch.weight.T
        loss = lml_loss(logits, batch.labels, self.tau)
        w = positive_weight(logits.detach(), batch.labels, None, self.tau)
        metrics = {"loss": loss.item(), "tau": self.tau}
        if batch.valid_ids is None:
            metrics["w_mean"] = w.mean().item()
            return loss, metrics
        multi = multi_choice(batch.valid_ids)
        metrics["w_mean"] = mean_over(w, multi)
        metrics.update(invalid_mass_metrics(logits.detach(), batch.valid_ids, self.tau))
        return loss, metrics


def multi_choice(valid_ids: torch.Tensor) -> torch.Tensor:
    """(N,) bool: positions whose valid set has more than one token (the ones MSL trains on)."""
    return (valid_ids >= 0).sum(1) > 1


def mean_over(values: torch.Tensor, keep: torch.Tensor) -> float:
    """Mean of ``values[keep]``; NaN when nothing is kept (a batch of single-choice positions)."""
    return values[keep].double().mean().item() if bool(keep.any()) else float("nan")


def invalid_mass_metrics(logits: torch.Tensor, valid_ids: torch.Tensor, tau: float) -> dict[str, float]:
    """``valid_size`` (all positions) and ``invalid_mass``: mean over multi-choice positions of the
    full softmax's mass outside the valid set. Needs full-vocabulary logits (N, V). Not Fig. 5's w."""
    mass = 1.0 - valid_probability(logits, valid_ids, tau)
    return {"valid_size": (valid_ids >= 0).sum(1).float().mean().item(),
            "invalid_mass": mean_over(mass, multi_choice(valid_ids))}
