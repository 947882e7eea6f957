"""The one interface every loss implements, and what the LightningModule hands it.

The module runs the backbone to its final hidden states and keeps only the positions that
predict a response token (the last prompt token .. the token before EOS). Losses get those
rows, never full-vocabulary logits for prompt positions; each loss decides what to score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ResponseBatch:
    """Response positions of a batch, flattened row-major (sequence by sequence, in order).

    Shapes: N response positions, d hidden size, V vocabulary, K widest valid set, S sequences.
    """

    hidden: torch.Tensor  # (N, d) final hidden states (after the last norm) predicting each label
    labels: torch.Tensor  # (N,) the response token each position predicts (title tokens, then EOS)
    weight: torch.Tensor  # (V, d) output embedding (lm_head weight); may be frozen
    seq_index: torch.Tensor  # (N,) sequence each position belongs to, in 0..S-1
    first: torch.Tensor  # (N,) bool: the sequence's first response position (the trie root)
    num_sequences: int  # S: B positives, then B * num_negatives negatives (S-DPO) in (b, j) order
    valid_ids: torch.Tensor | None = None  # (N, K) valid next-token ids, padded with -1
    ref_logps: torch.Tensor | None = None  # (S,) reference log P(response), no grad (S-DPO)


class RecLoss(nn.Module):
    """Base class. Subclasses set the flags; the module asks the flags, never the class."""

    needs_valid_ids: bool = False  # the module must pass ``valid_ids``
    needs_reference: bool = False  # the module must pass ``ref_logps`` (adapter disabled)
    num_negatives: int = 0  # extra sequences per sample the data module must add (S-DPO)

    def forward(self, batch: ResponseBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the scalar loss and a dict of floats to log (e.g. ``tau``, ``w_mean``)."""
        raise NotImplementedError

    def on_optimizer_step(self) -> dict[str, float]:
        """Called once per optimizer step (after every micro-batch of the step has run forward and
        backward, before the parameters change). A loss that keeps per-step state (ATS) updates it
        here; returns floats to log. Default: nothing."""
        return {}
