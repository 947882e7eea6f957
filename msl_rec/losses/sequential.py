"""Losses of the sequential recommenders (:mod:`msl_rec.models.sequential`) over full item scores.

Every loss is ``forward(scores (N, I) float, targets (N,) int64) -> (loss scalar, metrics dict[str, float])``,
with N scored rows (training windows, or BERT4Rec's masked positions) and I items. Computed in float32 or wider
whatever the scores' dtype.

- :class:`CELoss`: full-softmax cross-entropy (RecBole's CE).
- :class:`BCELoss`: the DROS / LLaRA released SASRec loss, BCE on the target and sampled negatives.
- :class:`DROSLoss`: BCE + ``alpha`` * DROS's distributionally robust term (``SASRec_bce.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from msl_rec.losses.base import loss_setting

__all__ = ["BCELoss", "CELoss", "DROSLoss", "dro_term", "propensity_scores", "sample_negatives"]


def _checked(loss: str, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``scores`` in float32 or wider; ValueError with the shapes when they do not fit ``targets``."""
    if scores.dim() != 2 or not scores.dtype.is_floating_point:
        raise ValueError(f"{loss}: scores must be a 2-D float tensor (N, num_items); got {tuple(scores.shape)} "
                         f"{scores.dtype}")
    if targets.shape != scores.shape[:1] or targets.dtype.is_floating_point:
        raise ValueError(f"{loss}: targets must be (N,) integers for scores {tuple(scores.shape)}; got "
                         f"{tuple(targets.shape)} {targets.dtype}")
    if len(targets) == 0:
        raise ValueError(f"{loss}: no rows to score (scores {tuple(scores.shape)})")
    if bool(((targets < 0) | (targets >= scores.shape[1])).any()):
        raise ValueError(f"{loss}: targets must be item indices in [0, {scores.shape[1]}) for scores "
                         f"{tuple(scores.shape)}; got min {int(targets.min())}, max {int(targets.max())}")
    return scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores


class CELoss(nn.Module):
    """Cross-entropy over all items (softmax over the I scores of each row), averaged over rows."""

    def forward(self, scores: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss = F.cross_entropy(_checked("CELoss", scores, targets), targets)
        return loss, {"loss": loss.item()}


def sample_negatives(targets: torch.Tensor, num_items: int, num_negatives: int) -> torch.Tensor:
    """(N, k) items drawn uniformly among the ``num_items - 1`` items that are not the row's target.

    Draws ``0 .. num_items-2`` with torch's global RNG (of ``targets``' device) and shifts draws at or above
    the target up by one: uniform over the other items, the target never, no loop (DROS re-draws in a loop;
    same distribution).
    """
    if num_items < 2:
        raise ValueError(f"sample_negatives: need at least 2 items to draw a negative; got num_items={num_items}")
    draws = torch.randint(0, num_items - 1, (len(targets), num_negatives), device=targets.device)
    return draws + (draws >= targets[:, None]).long()


def _bce(scores: torch.Tensor, targets: torch.Tensor, num_negatives: int) -> torch.Tensor:
    """DROS's BCE: BCEWithLogits on the target's score (label 1) and ``num_negatives`` sampled items' scores
    (label 0) per row, the mean over all ``N + N * k`` of them (``torch.cat((pos, neg), 0)`` then mean)."""
    negatives = sample_negatives(targets, scores.shape[1], num_negatives)
    positive = scores.gather(1, targets[:, None]).flatten()
    negative = scores.gather(1, negatives).flatten()
    logits = torch.cat((positive, negative))
    labels = torch.cat((torch.ones_like(positive), torch.zeros_like(negative)))
    return F.binary_cross_entropy_with_logits(logits, labels)


class BCELoss(nn.Module):
    """The DROS / LLaRA released SASRec loss (``SASRec_bce.py``, ``alpha = 0``): see :func:`_bce`.
    Negatives come from torch's global RNG (seeded by ``seed_everything``, restored on resume).

    Args:
        num_negatives: negatives per row (the released code: 1).
    """

    def __init__(self, num_negatives: int = 1):
        super().__init__()
        self.num_negatives = loss_setting("num_negatives", num_negatives, at_least=1, integer=True)

    def forward(self, scores: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss = _bce(_checked("BCELoss", scores, targets), targets, self.num_negatives)
        return loss, {"loss": loss.item()}


def propensity_scores(counts: torch.Tensor, power: float = 0.05) -> torch.Tensor:
    """(I,) DROS's ``ps``: ``((count + 1) / sum(count + 1)) ** power`` from the training targets' item
    counts (``calcu_propensity_score``), computed in float64 as released, returned as float32."""
    smoothed = counts.double() + 1
    return (smoothed / smoothed.sum()).pow(power).float()


def dro_term(scores: torch.Tensor, targets: torch.Tensor, ps: torch.Tensor, beta: float) -> torch.Tensor:
    """(N,) DROS's ``loss_dro`` per row, computed stably with the same value.

    Released: ``log(sum_j exp(ps_j s_j^2 / beta) - exp(ps_t s_t^2 / beta) + exp(ps_t (s_t - 1)^2 / beta)
    + 1e-24)``, i.e. the log-sum-exp of ``ps_j s_j^2 / beta`` over the items with the target's term replaced by
    ``ps_t (s_t - 1)^2 / beta``. As a logsumexp it cannot overflow (the released sum is inf once
    ``ps s^2 / beta`` passes ~88 in float32). The ``+ 1e-24`` is dropped: with ``beta > 0`` every term is
    ``>= 1``, so the sum is ``>= I`` and adding 1e-24 does not change it in float32 or float64.
    """
    exponents = ps * scores.square() / beta  # (N, I)
    target_score = scores.gather(1, targets[:, None])
    target_exponent = ps[targets][:, None] * (target_score - 1).square() / beta
    return torch.logsumexp(exponents.scatter(1, targets[:, None], target_exponent), dim=1)


class DROSLoss(nn.Module):
    """DROS (Yang et al. 2023): ``BCE + alpha * mean(loss_dro)`` exactly as ``SASRec_bce.py`` computes it
    (BCE of :class:`BCELoss`; ``loss_dro`` of :func:`dro_term`; ``alpha = 0`` is BCE alone, as released).

    :meth:`set_item_counts` must be called before the first forward, with the training targets' counts per
    item; ``ps`` is a non-persistent buffer (recomputed from the data at every start).

    Args:
        alpha: weight of the DRO term, >= 0.
        beta: the DRO radius temperature, > 0.
        power: exponent of the propensity scores (released: 0.05), >= 0.
        num_negatives: BCE negatives per row.
    """

    ps: torch.Tensor | None

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, power: float = 0.05, num_negatives: int = 1):
        super().__init__()
        self.alpha = loss_setting("alpha", alpha, at_least=0)
        self.beta = loss_setting("beta", beta, above=0)
        self.power = loss_setting("power", power, at_least=0)
        self.num_negatives = loss_setting("num_negatives", num_negatives, at_least=1, integer=True)
        self.register_buffer("ps", None, persistent=False)

    def set_item_counts(self, counts: torch.Tensor) -> None:
        """counts (I,): how often each item is a training target (>= 0)."""
        counts = torch.as_tensor(counts)
        if counts.dim() != 1 or len(counts) == 0:
            raise ValueError(f"DROSLoss.set_item_counts: counts must be (num_items,); got {tuple(counts.shape)}")
        if not bool(torch.isfinite(counts.double()).all()) or bool((counts < 0).any()):
            raise ValueError("DROSLoss.set_item_counts: counts must be finite and >= 0")
        device = self.ps.device if self.ps is not None else None
        self.ps = propensity_scores(counts, self.power).to(device)

    def forward(self, scores: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if self.ps is None:
            raise RuntimeError("DROSLoss: call set_item_counts(counts of the training targets per item) before "
                               "the first forward")
        scores = _checked("DROSLoss", scores, targets)
        if scores.shape[1] != len(self.ps):
            raise ValueError(f"DROSLoss: scores {tuple(scores.shape)} have {scores.shape[1]} items but "
                             f"set_item_counts had {len(self.ps)}")
        bce = _bce(scores, targets, self.num_negatives)
        ps = self.ps.to(device=scores.device, dtype=scores.dtype)
        if self.alpha == 0.0:  # as released: the DRO term is not even added (0 * inf would be NaN)
            with torch.no_grad():
                dro = dro_term(scores, targets, ps, self.beta).mean()
            loss = bce
        else:
            dro = dro_term(scores, targets, ps, self.beta).mean()
            loss = bce + self.alpha * dro
        values = torch.stack([loss.detach(), bce.detach(), dro.detach()]).tolist()  # one sync
        return loss, dict(zip(("loss", "bce", "dro"), values, strict=True))
