"""S-DPO: softmax direct preference optimisation with several sampled negative items.

Recipe (as in the S-DPO paper and MSL's comparison; ``configs/experiment/books_sdpo.yaml``): train
with LML first, then start S-DPO from that SFT checkpoint (``sdpo.sft_ckpt``, merged into the base)
with ``beta = 1``, 3 negatives per sample, learning rate 1e-5, for 3 epochs. The loss config holds
only the loss's hyperparameters (beta, num_negatives); the recipe's lr and epochs are set by the
preset as ``optim.lr`` and ``trainer.max_epochs``.

The recipe's two steps besides the loss live here too: :func:`merge_negatives` puts the sampled
negatives after the positives in one batch, and :func:`reference_logps` scores every sequence with
the reference model, which is the same network with its LoRA adapter disabled (the SFT weights),
so no second copy is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from msl_rec.data.datamodule import IGNORE_INDEX, left_pad
from msl_rec.losses.base import RecLoss, ResponseBatch, loss_setting
from msl_rec.losses.functional import sdpo_loss, sequence_logps


class SDPOLoss(RecLoss):
    """S-DPO over ``S = B * (1 + n)`` sequences: B positives, then the negatives in (b, j) order.

    Args:
        beta: scale of the implicit reward ``beta * (log pi - log pi_ref)``, > 0 (0 makes the loss
            a constant, a negative beta rewards the negatives).
        num_negatives: n >= 1, negatives per sample the data module must add.

    Metrics: ``loss``, ``reward_margin`` (mean of ``beta * (r_pos - mean_j r_neg_j)``) and
    ``reward_accuracy`` (share of samples whose positive reward beats every negative's).
    """

    needs_reference = True

    def __init__(self, beta: float = 1.0, num_negatives: int = 3):
        super().__init__()
        self.beta = loss_setting("beta", beta, above=0)
        self.num_negatives = loss_setting("num_negatives", num_negatives, at_least=1, integer=True)

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


def merge_negatives(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) of the positives, then the negatives in (b, j) order,
    left-padded to one length: ``S = B * (1 + n)`` rows."""
    ids, am, lab = batch["input_ids"], batch["attention_mask"], batch["labels"]
    nids, nam, nlab = batch["neg_input_ids"], batch["neg_attention_mask"], batch["neg_labels"]
    pad_id = int(ids[am == 0][0]) if bool((am == 0).any()) else 0

    def stacked(pos: torch.Tensor, neg: torch.Tensor, value: int) -> torch.Tensor:
        # rows are already left-padded: padding the narrower side on the left keeps them so
        return left_pad(pos.tolist() + neg.tolist(), value).to(pos.device)

    return stacked(ids, nids, pad_id), stacked(am, nam, 0), stacked(lab, nlab, IGNORE_INDEX)


@torch.no_grad()
def reference_logps(model: nn.Module, hidden_states: Callable[[], torch.Tensor], weight: torch.Tensor,
                    labels: torch.Tensor, seq_index: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """(S,) log P_ref(response) of every sequence: ``hidden_states()`` (the (N, d) response rows)
    run with ``model``'s adapter disabled, i.e. the base with the merged SFT adapter."""
    with model.disable_adapter():
        hidden = hidden_states()
    return sequence_logps(hidden, weight, labels, seq_index, num_sequences).detach()
