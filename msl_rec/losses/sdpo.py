"""S-DPO: softmax direct preference optimisation with several sampled negative items.

Recipe (as in the S-DPO paper and MSL's comparison): train with LML first, then start S-DPO from
that SFT checkpoint with ``beta = 1``, 3 negatives per sample, learning rate 1e-5, for 3 epochs.
The reference model is the same network with its LoRA adapter disabled (the SFT weights), so the
LightningModule computes ``ref_logps`` under ``disable_adapter()`` and no second copy is kept.
"""

from __future__ import annotations

import torch

from msl_rec.losses.base import RecLoss, ResponseBatch
from msl_rec.losses.functional import sdpo_loss, sequence_logps


class SDPOLoss(RecLoss):
    """S-DPO over ``S = B * (1 + n)`` sequences: B positives, then the negatives in (b, j) order.

    Args:
        beta: scale of the implicit reward ``beta * (log pi - log pi_ref)``.
        num_negatives: n, negatives per sample the data module must add.
        sft_ckpt, lr, epochs, fixed_negatives: the recipe, carried here so the Hydra config stays
            one flat node. ``forward`` never uses them; the training app reads them from the
            instantiated loss (``loss.sft_ckpt`` ...): the checkpoint to start from, the learning
            rate and epoch count to use, and whether negatives are sampled once (True) or anew
            every epoch (False).

    Metrics: ``loss``, ``reward_margin`` (mean of ``beta * (r_pos - mean_j r_neg_j)``) and
    ``reward_accuracy`` (share of samples whose positive reward beats every negative's).
    """

    needs_reference = True

    def __init__(self, beta: float = 1.0, num_negatives: int = 3, sft_ckpt: str | None = None,
                 lr: float = 1e-5, epochs: int = 3, fixed_negatives: bool = False):
        super().__init__()
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        self.beta = float(beta)
        self.num_negatives = int(num_negatives)
        self.sft_ckpt = sft_ckpt
        self.lr = float(lr)
        self.epochs = int(epochs)
        self.fixed_negatives = bool(fixed_negatives)

    def forward(self, batch: ResponseBatch) -> tuple[torch.Tensor, dict[str, float]]:
        if batch.ref_logps is None:
            raise ValueError("SDPOLoss needs batch.ref_logps (log P_ref of every sequence)")
        n, s = self.num_negatives, batch.num_sequences
        if s % (1 + n):
            raise ValueError(f"num_sequences={s} is not a multiple of 1 + num_negatives={1 + n}")
        b = s // (1 + n)
        logps = sequence_logps(batch.hidden, batch.weight, batch.labels, batch.seq_index, s)
        ref = batch.ref_logps.detach().to(logps.dtype)
        pos, neg = logps[:b], logps[b:].view(b, n)
        ref_pos, ref_neg = ref[:b], ref[b:].view(b, n)
        loss = sdpo_loss(pos, neg, ref_pos, ref_neg, self.beta)
        with torch.no_grad():
            r_pos = self.beta * (pos - ref_pos)
            r_neg = self.beta * (neg - ref_neg)
            margin = (r_pos - r_neg.mean(1)).mean()
            accuracy = (r_pos > r_neg.max(1).values).float().mean()
        return loss, {"loss": loss.item(), "reward_margin": margin.item(), "reward_accuracy": accuracy.item()}
