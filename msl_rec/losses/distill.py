"""DLLM2Rec (Cui et al., RecSys 2024, "Distillation Matters"): a sequential student trained with its own loss
plus importance-aware ranking distillation from an LLM teacher's top-K list of each training row.

As released (github.com/istarryn/DLLM2Rec ``main.py``, lines 433-491), per training row ``b`` with teacher list
``c_b1 .. c_bK`` (best first) and the student's scores ``s_b`` (one forward, dropout on):

- position weight ``w_rank_i = exp(-i) / sum_j exp(-j)``, i = 1..K (``_lambda = 1``);
- consistency weight ``w_com_bi = [c_bi in the student's top K] + 1e-8`` (not normalised);
- confidence weight ``w_conf_bi = (exp(-d_bi) + 1e-8) / sum_j (exp(-d_bj) + 1e-8)`` with ``d`` the teacher's
  distance of the item (BIGRec's L2 grounding distance; here ``-score`` of the prediction row, which is that
  distance for ``decoder=grounding`` and the mean negative log-likelihood per token for beam search);
- ``w_bi = g_pos w_rank_i + g_conf w_conf_bi + g_cons w_com_bi``, normalised over i;
- ``L_rd = sum_i mean_b w_bi * (-log sig(s_b[c_bi]) - log sig(1 - s_b[n_b]))`` with ``n_b`` the row's sampled
  BCE negative (sic: ``sig(1 - s)``, not ``1 - sig(s)``); with DROS (``alpha != 0``) each candidate adds
  ``alpha * mean((w_{:,i} (B, 1)) * dro_i (B,))``, which broadcasts to (B, B): ``mean_b w_bi * mean_b dro_bi``;
- ``loss = base + lam * L_rd``; base = BCE (+ ``alpha`` x DROS's term, :class:`~msl_rec.losses.DROSLoss`).

The weights carry no gradient (ranks, the teacher's numbers and an argsort). Rows without a teacher list
(``teacher_items`` row of -1) get the base loss only: their ``w`` is 0, and the mean is still over all rows, so
a taught row contributes exactly as in the released code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from msl_rec.losses.base import loss_setting
from msl_rec.losses.sequential import DROSLoss, _checked, dro_term, sample_negatives

__all__ = ["DLLM2RecLoss", "ranking_weights"]

WEIGHT_EPS = 1e-8  # the released code's guard on the consistency and confidence weights


def ranking_weights(scores: torch.Tensor, teacher_items: torch.Tensor, teacher_distance: torch.Tensor,
                    gamma_position: float, gamma_confidence: float, gamma_consistency: float) -> torch.Tensor:
    """(B, K) DLLM2Rec's importance weights ``w`` of each row's K teacher items (module docstring), no grad.

    Args:
        scores: (B, I) the student's item scores of the rows.
        teacher_items: (B, K) item indices, best first (every entry valid).
        teacher_distance: (B, K) the teacher's distance of each item (lower: more confident).
    """
    k = teacher_items.shape[1]
    with torch.no_grad():
        position = torch.exp(-torch.arange(1, k + 1, dtype=scores.dtype, device=scores.device))
        position = (position / position.sum())[None, :]
        student_top = scores.topk(k, dim=1).indices  # the released argsort(-scores)[:, :K]; ties may differ
        consistency = (teacher_items[:, :, None] == student_top[:, None, :]).any(dim=2).to(scores.dtype) + WEIGHT_EPS
        confidence = torch.exp(-teacher_distance.to(scores.dtype)) + WEIGHT_EPS
        confidence = confidence / confidence.sum(dim=1, keepdim=True)
        weight = gamma_position * position + gamma_confidence * confidence + gamma_consistency * consistency
        return weight / weight.sum(dim=1, keepdim=True)


class DLLM2RecLoss(DROSLoss):
    """The student's base loss (BCE, or BCE + DROS with ``alpha > 0``) + ``lam`` x DLLM2Rec's importance-aware
    ranking distillation (module docstring). Defaults are the released ``main.py``'s except ``alpha``: 0 here
    (the student's base loss is ``method=sasrec``'s BCE); the released default 1.0 is SASRec+DROS (README: 0.5).

    ``forward(scores (B, I), targets (B,), teacher_items (B, W) int64 | None, teacher_distance (B, W) | None)``:
    ``teacher_items`` holds catalog indices, best first, -1 where a row has no list (the first ``candidate_topk``
    entries of a taught row must all be items). Without a teacher (validation) the base loss alone.
    The module passes the teacher because :attr:`needs_teacher` is set.

    Args:
        lam: weight of the ranking distillation, >= 0 (released 0.8).
        candidate_topk: K, the teacher items per row used (released 10).
        gamma_position, gamma_confidence, gamma_consistency: the three weights' mix, >= 0, not all 0
            (released 0.3, 0.5, 0.1).
        alpha: DROS's weight in the base loss and in each candidate's term, >= 0 (0: BCE, as ``method=sasrec``).
        beta: DROS's radius temperature, > 0. power: DROS's propensity exponent, >= 0.
        num_negatives: BCE negatives per row (released 1); with more, each candidate's negative part is their mean.
    """

    needs_teacher = True

    def __init__(self, lam: float = 0.8, candidate_topk: int = 10, gamma_position: float = 0.3,
                 gamma_confidence: float = 0.5, gamma_consistency: float = 0.1, alpha: float = 0.0, beta: float = 1.0,
                 power: float = 0.05, num_negatives: int = 1):
        super().__init__(alpha, beta, power, num_negatives)  # DROS's settings, item counts and ps buffer
        self.lam = loss_setting("lam", lam, at_least=0)
        self.candidate_topk = loss_setting("candidate_topk", candidate_topk, at_least=1, integer=True)
        self.gammas = tuple(loss_setting(k, v, at_least=0) for k, v in (
            ("gamma_position", gamma_position), ("gamma_confidence", gamma_confidence),
            ("gamma_consistency", gamma_consistency)))
        if sum(self.gammas) == 0:
            raise ValueError("loss.gamma_position, loss.gamma_confidence, loss.gamma_consistency: all 0 leaves the "
                             "distillation weights 0/0; give at least one > 0")

    def _ps(self, scores: torch.Tensor) -> torch.Tensor:
        if self.ps is None or len(self.ps) != scores.shape[1]:
            raise RuntimeError(f"DLLM2RecLoss with loss.alpha={self.alpha}: call set_item_counts(counts of the "
                               f"{scores.shape[1]} items as training targets) before the first forward")
        return self.ps.to(device=scores.device, dtype=scores.dtype)

    def forward(self, scores: torch.Tensor, targets: torch.Tensor, teacher_items: torch.Tensor | None = None,
                teacher_distance: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        scores = _checked("DLLM2RecLoss", scores, targets)
        negatives = sample_negatives(targets, scores.shape[1], self.num_negatives)  # (B, k), as BCELoss draws them
        positive = scores.gather(1, targets[:, None]).flatten()
        negative = scores.gather(1, negatives).flatten()
        bce = F.binary_cross_entropy_with_logits(torch.cat((positive, negative)),
                                                 torch.cat((torch.ones_like(positive), torch.zeros_like(negative))))
        loss, parts = bce, {"bce": bce.detach()}
        ps = self._ps(scores) if self.alpha != 0 else None
        if ps is not None:
            dro = dro_term(scores, targets, ps, self.beta).mean()
            loss, parts["dro"] = loss + self.alpha * dro, dro.detach()
        if teacher_items is not None and self.lam != 0:
            distill, taught = self.distillation(scores, negatives, teacher_items, teacher_distance, ps)
            loss = loss + self.lam * distill
            parts.update(distill=distill.detach(), taught=taught)
        values = torch.stack([loss.detach(), *(torch.as_tensor(v, dtype=loss.dtype) for v in parts.values())]).tolist()
        return loss, dict(zip(("loss", *parts), values, strict=True))

    def distillation(self, scores: torch.Tensor, negatives: torch.Tensor, teacher_items: torch.Tensor,
                     teacher_distance: torch.Tensor | None, ps: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L_rd, share of rows taught)``: the ranking distillation term (module docstring) over the B rows.

        Args:
            scores: (B, I); negatives: (B, k) the base BCE's sampled items; teacher_items / teacher_distance:
                (B, W >= candidate_topk), -1 / anything on rows without a list; ps: (I,) DROS's, or None.
        """
        k = self.candidate_topk
        if teacher_distance is None or teacher_items.shape != teacher_distance.shape:
            raise ValueError("DLLM2RecLoss: teacher_items and teacher_distance must both be given, of one shape; got "
                             f"{None if teacher_distance is None else tuple(teacher_distance.shape)} for "
                             f"{tuple(teacher_items.shape)}")
        if teacher_items.dim() != 2 or teacher_items.shape[0] != scores.shape[0] or teacher_items.shape[1] < k:
            raise ValueError(f"DLLM2RecLoss: teacher_items {tuple(teacher_items.shape)} must be (B, >= "
                             f"loss.candidate_topk={k}) for scores {tuple(scores.shape)} (one list per scored row)")
        items, distance = teacher_items[:, :k], teacher_distance[:, :k]
        taught = items[:, 0] >= 0
        if bool((items[taught] < 0).any()) or bool((items >= scores.shape[1]).any()):
            raise ValueError(f"DLLM2RecLoss: a taught row's first loss.candidate_topk={k} teacher items must all be "
                             f"item indices in [0, {scores.shape[1]})")
        items = items.clamp(min=0)  # untaught rows: any item, their weight is 0
        weight = ranking_weights(scores, items, distance.masked_fill(~taught[:, None], 0.0), *self.gammas)
        weight = weight * taught[:, None].to(weight.dtype)  # (B, K)
        positive = F.logsigmoid(scores.gather(1, items))  # (B, K)
        negative = F.logsigmoid(1 - scores.gather(1, negatives)).mean(dim=1, keepdim=True)  # (B, 1), sic
        distill = (weight * -(positive + negative)).sum(dim=1).mean()
        if ps is not None:  # released: (w[:, i:i+1] (B,1) * dro_i (B,)).mean() = mean_b w_bi * mean_b dro_bi
            dro = torch.stack([dro_term(scores, items[:, i], ps, self.beta) for i in range(k)], dim=1)  # (B, K)
            dro_mean = (dro * taught[:, None]).sum(dim=0) / taught.sum().clamp(min=1)  # over taught rows
            distill = distill + self.alpha * (weight.mean(dim=0) * dro_mean).sum()
        return distill, taught.to(scores.dtype).mean()
