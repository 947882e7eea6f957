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


class LMDecoder(Decoder):
    """A decoder that drives a causal LM through the inference runner it is handed
    (:class:`~msl_rec.models.inference.LMRunner`): constrained beam search, grounding. Subclasses implement
    :meth:`search` over the users' encoded prompts."""

    @abstractmethod
    def search(self, lm, prompts) -> list[Ranking]:
        """Per user of the encoded ``prompts`` (``lm.encode_prompts``): its ranking."""

    def rank(self, lm, batch: Mapping[str, torch.Tensor]) -> list[Ranking]:
        """Rank ``batch``'s users (its ``prompt_input_ids`` / ``prompt_attention_mask``) with the
        inference runner ``lm`` (``CausalLMInference(...).bind(model)``; the evaluation's
        ``BatchPredictor`` builds it from this decoder's ``dtype``/``shared_prompt``/``share_preamble``)."""
        if not hasattr(lm, "encode_prompts"):
            raise TypeError(f"{type(self).__name__}.rank needs an inference runner, got {type(lm).__name__}: use "
                            "msl_rec.evaluation.predict.BatchPredictor(decoder, catalog).predict(model, batch), or "
                            "CausalLMInference(dtype=...).bind(model) from msl_rec.models.inference")
        return self.search(lm, lm.encode_prompts(batch["prompt_input_ids"], batch["prompt_attention_mask"]))
