"""Decoders that turn a (fine-tuned) LLM, or no model at all, into ranked catalog items.

``build_decoder(cfg, catalog, train_targets)`` builds one from a ``configs/decoder/*.yaml`` config;
:func:`~msl_rec.decoding.evaluate.evaluate` runs it and computes NDCG/HR.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from msl_rec.decoding.base import Decoder, Ranking
from msl_rec.decoding.baselines import PopularityRanker, RandomRanker
from msl_rec.decoding.beam import ConstrainedBeamSearch
from msl_rec.decoding.evaluate import (
    EvalResult,
    evaluate,
    load_predictions,
    merge_predictions,
    save_eval_result,
)

__all__ = ["ConstrainedBeamSearch", "Decoder", "EvalResult", "PopularityRanker", "RandomRanker", "Ranking",
           "build_decoder", "evaluate", "load_predictions", "merge_predictions", "save_eval_result"]

# config name -> (class, fixed settings)
_REGISTRY = {
    "cbs_masked": (ConstrainedBeamSearch, {"mask": "before"}),
    "cbs": (ConstrainedBeamSearch, {"mask": "after"}),
    "constrainedbeamsearch": (ConstrainedBeamSearch, {}),
    "popularity": (PopularityRanker, {}),
    "popularityranker": (PopularityRanker, {}),
    "random": (RandomRanker, {}),
    "randomranker": (RandomRanker, {}),
}


def build_decoder(cfg, catalog, train_targets: Iterable[int] | None = None) -> Decoder:
    """Build the decoder a ``configs/decoder`` config names (by ``name`` or ``_target_``).

    Every other key is passed to the class; ``popularity`` needs ``train_targets`` (the training
    samples' target item ids).
    """
    if not isinstance(cfg, Mapping):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = dict(cfg)
    target = cfg.pop("_target_", None)
    name = cfg.pop("name", None)
    key = (name or (target or "").rsplit(".", 1)[-1]).lower()
    if key not in _REGISTRY:
        raise ValueError(f"decoder: unknown name {name or target!r}; choose from {sorted(_REGISTRY)}")
    cls, fixed = _REGISTRY[key]
    kwargs = {**fixed, **cfg}  # the name sets defaults (cbs_masked: mask=before); explicit keys win
    if "top_k" in kwargs:
        kwargs["top_k"] = tuple(kwargs["top_k"])
    if cls is PopularityRanker:
        if train_targets is None:
            raise ValueError("decoder 'popularity' needs train_targets (the training target item ids)")
        return cls(catalog, train_targets, **kwargs)
    decoder = cls(catalog, **kwargs)
    if isinstance(decoder, ConstrainedBeamSearch):
        from msl_rec.data.catalog import warn_undecodable_titles

        warn_undecodable_titles(catalog, decoder.max_new_tokens)
    return decoder
