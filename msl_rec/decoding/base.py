"""The interface every decoder implements: rank catalog sequences for a batch of users."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch

Ranking = list[tuple[int, float]]
"""One user's recommendations: ``(sequence index into catalog.sequences, score)``, best first."""


class Decoder(ABC):
    """Turns a batch into ranked catalog sequences.

    Attributes:
        needs_model: whether :meth:`rank` uses the model (baselines ignore it, so it may be None).
        top_k: the cut-offs this decoder is configured to be evaluated at.
    """

    needs_model: bool = True
    top_k: tuple[int, ...] = (1, 5, 10)

    @abstractmethod
    def rank(self, model, batch: Mapping[str, torch.Tensor]) -> list[Ranking]:
        """Per user in ``batch``: distinct ``(sequence index, score)`` pairs, best first."""
