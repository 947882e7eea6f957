"""The one interface every loss implements, and what the LightningModule hands it.

The module runs the backbone to its final hidden states and keeps only the positions that
predict a response token (the last prompt token .. the token before EOS). Losses get those
rows, never full-vocabulary logits for prompt positions; each loss decides what to score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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


# ---------------------------------------------------------------------------- settings checks
# Every loss checks its settings at construction, so a meaningless value (``loss.tau=0``: NaN at the
# first step, which the NaN guard would blame on the lr) stops the run at once with the key named.
def checked_number(key: str, value: Any, *, above: float | None = None, at_least: float | None = None,
                   at_most: float | None = None, below: float | None = None, integer: bool = False) -> float | int:
    """``value`` of the config key ``key`` (dotted, e.g. ``loss.tau``) as a finite float (an int with
    ``integer``), checked to be ``> above``, ``>= at_least``, ``<= at_most`` and ``< below`` where given.

    Raises:
        ValueError naming the key, e.g. ``loss.tau=0: must be > 0`` or ``loss.tau='abc': must be a
        number``, for a non-number (a bool included), NaN or inf, a fraction where a whole number
        is needed, or a value out of range.
    """
    kind = "a whole number" if integer else "a number"
    try:
        if isinstance(value, bool):  # float(True) == 1.0 would pass silently
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r}: must be {kind}") from None
    if not math.isfinite(number):
        raise ValueError(f"{key}={value!r}: must be a finite number")
    if integer:
        if number != int(number):
            raise ValueError(f"{key}={value!r}: must be {kind}")
        number = int(number)
    for ok, requirement in ((above is None or number > above, f"> {above}"),
                            (at_least is None or number >= at_least, f">= {at_least}"),
                            (at_most is None or number <= at_most, f"<= {at_most}"),
                            (below is None or number < below, f"< {below}")):
        if not ok:
            raise ValueError(f"{key}={value!r}: must be {requirement}")
    return number


def loss_setting(key: str, value: Any, **bounds: Any) -> float | int:
    """:func:`checked_number` for the loss config key ``loss.<key>`` (same ``bounds`` keywords)."""
    return checked_number(f"loss.{key}", value, **bounds)


def loss_flag(key: str, value: Any) -> bool:
    """``value`` of the config key ``loss.<key>`` as a bool; anything but true/false is a ValueError
    naming the key (``bool("false")`` would be True)."""
    if not isinstance(value, bool):
        raise ValueError(f"loss.{key}={value!r}: must be true or false")  # noqa: TRY004 (a bad config value)
    return value


def loss_choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` of the config key ``loss.<key>``, which must be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"loss.{key}={value!r}: must be one of {', '.join(choices)}")
    return value
