"""Decoders that turn a (fine-tuned) LLM, or no model at all, into ranked catalog items.

``build_decoder(cfg, catalog, train_targets)`` builds one from a ``configs/decoder/*.yaml`` config
with ``hydra.utils.instantiate`` (allowlisted targets only); :mod:`msl_rec.evaluation` runs it and
computes NDCG/HR.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from hydra.utils import instantiate

from msl_rec.data.catalog import warn_undecodable_titles
from msl_rec.decoding.base import Decoder, Ranking
from msl_rec.decoding.baselines import PopularityRanker, RandomRanker
from msl_rec.decoding.beam import ConstrainedBeamSearch
from msl_rec.decoding.grounding import Grounding
from msl_rec.decoding.scores import ItemScoreRanker
from msl_rec.utils.config import plain
from msl_rec.utils.precision import eval_dtype
from msl_rec.utils.registry import DECODERS, ConfigSecurityError, check_targets

__all__ = [
    "ConstrainedBeamSearch",
    "Decoder",
    "Grounding",
    "ItemScoreRanker",
    "PopularityRanker",
    "RandomRanker",
    "Ranking",
    "build_decoder",
    "decoder_settings",
    "max_response_len",
    "needs_train_targets",
    "validate_top_k",
]

# what a decoder's name sets when its config does not (explicit keys win): cbs is transformers' masking
NAME_DEFAULTS = {"cbs": {"mask": "after"}, "cbs_masked": {"mask": "before"}}
_CLASSES = {"msl_rec.decoding.ConstrainedBeamSearch": ConstrainedBeamSearch,
            "msl_rec.decoding.PopularityRanker": PopularityRanker, "msl_rec.decoding.RandomRanker": RandomRanker,
            "msl_rec.decoding.ItemScoreRanker": ItemScoreRanker, "msl_rec.decoding.Grounding": Grounding}


def decoder_target(cfg: Mapping[str, Any]) -> str:
    """The ``_target_`` a decoder config builds: its own, or (a config saved before decoders had one, e.g.
    a checkpoint's hyperparameters) the one its ``name`` stands for (:data:`~msl_rec.utils.registry.DECODERS`)."""
    target, name = cfg.get("_target_"), cfg.get("name")
    if target is None:
        target = next((t for t, names in DECODERS.items() if name in names), None)
        if target is None:
            names = sorted(n for ns in DECODERS.values() for n in ns)
            raise ValueError(f"decoder: unknown name {name!r}; choose from {names}")
    if target not in DECODERS:
        raise ConfigSecurityError(f"decoder config: decoder._target_={target!r} is not a msl-rec decoder; choose one "
                                  f"of {sorted(DECODERS)} (msl_rec/utils/registry.py)")
    return target


def needs_train_targets(cfg) -> bool:
    """Whether the decoder a config names ranks by the training targets (popularity)."""
    return _CLASSES[decoder_target(plain(cfg))] is PopularityRanker


def validate_top_k(top_k, key: str = "top_k") -> tuple[int, ...]:
    """``top_k`` as a tuple of distinct positive ints; an empty list, a 0 or a non-integer is an error."""
    try:
        ks = [int(k) for k in top_k]
        if any(float(k) != int(k) for k in top_k):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{key}={top_k!r}: expected a list of positive whole numbers, e.g. [1,5,10]") from None
    if not ks or min(ks) < 1:
        raise ValueError(f"{key}={list(top_k)}: needs at least one cut-off and every K >= 1, e.g. [1,5,10]")
    return tuple(sorted(set(ks)))


def max_response_len(catalog) -> int:
    """Tokens in the catalog's longest response (title + EOS): the decoders' default ``max_new_tokens``."""
    return max(len(s) for s in catalog.sequences)


def decoder_settings(cfg, top_k: Sequence[int] | None = None) -> tuple[type, dict]:
    """The decoder class a ``configs/decoder`` config names and its keyword arguments, ``top_k``
    checked (see :func:`build_decoder`); no catalog needed, so a run can check it before loading."""
    cfg = dict(plain(cfg))
    cls = _CLASSES[decoder_target(cfg)]
    fixed = NAME_DEFAULTS.get(cfg.get("name"), {})
    cfg.pop("_target_", None)
    cfg.pop("name", None)
    own_top_k = cfg.pop("top_k", None)
    if top_k is None:
        top_k = own_top_k if own_top_k is not None else (1, 5, 10)
    elif own_top_k is not None and validate_top_k(own_top_k, "decoder.top_k") != validate_top_k(top_k):
        raise ValueError(f"decoder.top_k={list(own_top_k)} differs from top_k={list(top_k)}: the cut-offs are set "
                         "once, by the top-level top_k; remove decoder.top_k")
    kwargs = {**fixed, **cfg, "top_k": validate_top_k(top_k)}  # the name sets defaults; explicit keys win
    if cls is ConstrainedBeamSearch:
        eval_dtype(kwargs.get("dtype", "float32"))  # dtype=auto (machine-dependent metrics) fails at start-up
        beams = int(kwargs.get("num_beams", 10))
        if max(kwargs["top_k"]) > beams:
            raise ValueError(f"top_k={list(kwargs['top_k'])} asks for K={max(kwargs['top_k'])} but decoder.num_beams="
                             f"{beams} ranks only {beams} items per user (HR@K would equal HR@{beams}); lower top_k or "
                             f"set decoder.num_beams={max(kwargs['top_k'])}")
    if cls is Grounding:
        eval_dtype(kwargs.get("dtype", "float32"))
        n_results = kwargs.get("num_results")
        if n_results is not None and max(kwargs["top_k"]) > int(n_results):
            raise ValueError(f"top_k={list(kwargs['top_k'])} asks for K={max(kwargs['top_k'])} but decoder.num_results="
                             f"{n_results} ranks only {n_results} items per user; lower top_k or raise "
                             "decoder.num_results (null: max(top_k))")
    return cls, kwargs


def build_decoder(cfg, catalog, train_targets: Iterable[int] | None = None,
                  top_k: Sequence[int] | None = None) -> Decoder:
    """Build the decoder a ``configs/decoder`` config names (``_target_``, or ``name`` alone in a config
    saved before decoders had one) with ``hydra.utils.instantiate``, the target checked first.

    Every other key is passed to the class with ``catalog``; ``popularity`` needs ``train_targets`` (the training
    samples' target item ids). ``top_k`` is the run's one list of cut-offs (the config's top-level
    ``top_k``); a decoder config that still carries its own ``top_k`` (saved by an older msl-rec) must
    agree with it. A K larger than the ranked list the decoder returns (``num_beams``) is an error:
    HR@20 of a 10-item list would silently equal HR@10. ``max_new_tokens: null`` (the default) is the
    catalog's longest response, so every title can be recommended.
    """
    cfg = plain(cfg)
    target = decoder_target(cfg)
    check_targets(cfg, source="decoder config", prefix="decoder.")
    cls, kwargs = decoder_settings(cfg, top_k)
    if cls in (ConstrainedBeamSearch, Grounding) and kwargs.get("max_new_tokens") is None:
        kwargs["max_new_tokens"] = max_response_len(catalog)
    if cls is PopularityRanker:
        if train_targets is None:
            raise ValueError("decoder 'popularity' needs train_targets (the training target item ids)")
        kwargs["train_targets"] = list(train_targets)
    # _convert_="all": the decoders get plain lists and dicts, catalog is passed through as the object it is
    decoder = instantiate({"_target_": target, **kwargs}, catalog=catalog, _convert_="all")
    n_results = getattr(decoder, "num_results", None)
    if n_results is not None and max(decoder.top_k) > n_results:
        raise ValueError(f"top_k={list(decoder.top_k)}: decoder.num_results={n_results} ranks fewer items than "
                         f"K={max(decoder.top_k)}")
    if isinstance(decoder, ConstrainedBeamSearch):
        warn_undecodable_titles(catalog, decoder.max_new_tokens)
    return decoder
