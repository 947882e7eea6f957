"""The ``method`` config group: which recommender a run trains or evaluates, and the checks that keep its
parts together.

``method.kind: llm`` (``method=bigrec``): a LoRA-tuned causal LM (:class:`~msl_rec.training.module.RecLitModule`)
with an LLM loss (lml, msl, msl_ats, sdpo) and an LLM decoder (cbs, cbs_masked, grounding) or a model-free one.
``method.kind: sequential`` (``method=sasrec|bert4rec``): an item-ID ``model``
(:class:`~msl_rec.training.sequential.SeqLitModule`) with its own loss (bce, ce, dros), ranked by
``decoder=item_scores`` (or popularity / random). A part of one kind with the other is an error naming both,
before anything is loaded.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from msl_rec.data.build import is_sequential
from msl_rec.decoding import decoder_target
from msl_rec.models.checkpoint import check_checkpoint_backbone
from msl_rec.training.module import RecLitModule
from msl_rec.training.sequential import SeqLitModule
from msl_rec.utils.config import plain
from msl_rec.utils.registry import LOSSES, SEQUENTIAL_LOSSES, SEQUENTIAL_MODELS

log = logging.getLogger(__name__)

METHOD_KINDS = ("llm", "sequential")
SEQUENTIAL_DECODERS = frozenset({"msl_rec.decoding.ItemScoreRanker"})
MODEL_FREE_DECODERS = frozenset({"msl_rec.decoding.PopularityRanker", "msl_rec.decoding.RandomRanker"})


def check_method(cfg: DictConfig, with_loss: bool = True) -> None:
    """Refuse a composition whose loss, model or decoder belongs to the other kind of method, naming the keys.
    ``with_loss`` False (evaluation): the loss is not used, so it is not checked."""
    method = cfg.get("method") or {}
    kind, name = method.get("kind", "llm"), method.get("name", "bigrec")
    if kind not in METHOD_KINDS:
        raise ValueError(f"method.kind={kind!r}: one of {list(METHOD_KINDS)} (configs/method/{name}.yaml)")
    loss = (cfg.get("loss") or {}).get("_target_")
    decoder = decoder_target(plain(cfg.decoder)) if cfg.get("decoder") else None
    model = (cfg.get("model") or {}).get("_target_")
    if kind == "sequential":
        if model not in SEQUENTIAL_MODELS:
            raise ValueError(f"method={name} is a sequential method but model._target_={model!r}: choose "
                             f"model={' or model='.join(SEQUENTIAL_MODELS.values())} (configs/model)")
        if with_loss and loss not in SEQUENTIAL_LOSSES:
            raise ValueError(f"method={name} trains an item-ID model, but loss={LOSSES.get(loss, loss)} is an LLM loss; "
                             f"use loss={' or loss='.join(LOSSES[t] for t in sorted(SEQUENTIAL_LOSSES))}")
        if cfg.get("save_w"):
            raise ValueError(f"save_w=true writes an LLM's w per response token; method={name} has no tokens")
        if decoder is not None and decoder not in SEQUENTIAL_DECODERS | MODEL_FREE_DECODERS:
            raise ValueError(f"method={name} ranks with its item scores, but decoder={cfg.decoder.get('name')} decodes "
                             "an LLM; use decoder=item_scores (or popularity / random)")
    else:
        if model is not None:
            raise ValueError(f"method={name} is an LLM method, but model={SEQUENTIAL_MODELS.get(model, model)} is a "
                             "sequential model; drop model= or use method=sasrec / method=bert4rec")
        if with_loss and loss in SEQUENTIAL_LOSSES:
            raise ValueError(f"method={name} tunes an LLM, but loss={LOSSES[loss]} is a sequential model's loss; use "
                             "loss=lml, msl, msl_ats or sdpo (or method=sasrec for loss=" + LOSSES[loss] + ")")
        if decoder in SEQUENTIAL_DECODERS:
            raise ValueError(f"method={name}: decoder=item_scores ranks a sequential model's scores; use "
                             "decoder=cbs_masked, cbs or grounding for an LLM")


def build_module(cfg: DictConfig, catalog, sft_ckpt: str | None = None):
    """The LightningModule a training config asks for (its model built; the LLM's backbone in configure_model)."""
    common = {"optim": plain(cfg.optim), "decoder": plain(cfg.get("decoder")), "top_k": list(cfg.top_k),
              "scoring": plain(cfg.scoring)}
    if is_sequential(cfg):
        return SeqLitModule(model=plain(cfg.model), loss=plain(cfg.loss), num_items=catalog.num_items,
                            catalog_sha256=catalog.fingerprint, **common)
    return RecLitModule(backbone=plain(cfg.backbone), loss=plain(cfg.loss), sft_ckpt=sft_ckpt, **common)


def load_module(cfg: DictConfig, catalog) -> Any:
    """The trained module of ``cfg.ckpt_path`` (checked against the config: backbone, or the catalog the
    sequential model was trained on), else the zero-shot backbone (LLM methods only)."""
    if is_sequential(cfg):
        if not cfg.get("ckpt_path"):
            raise ValueError(f"method={cfg.method.name} has no zero-shot model: give run_dir=<a training run> or "
                             "ckpt_path=<its checkpoint>")
        module = SeqLitModule.load_from_checkpoint(cfg.ckpt_path, map_location="cpu")
        module.check_catalog(catalog, f"checkpoint {cfg.ckpt_path}")
        log.info("loaded %s", cfg.ckpt_path)
        return module
    if cfg.get("ckpt_path"):
        check_checkpoint_backbone(cfg.ckpt_path, cfg.backbone)
        module = RecLitModule.load_from_checkpoint(cfg.ckpt_path, map_location="cpu")
        log.info("loaded %s", cfg.ckpt_path)
        return module
    module = RecLitModule(backbone=plain(cfg.backbone), loss=plain(cfg.loss))
    module.configure_model()
    log.info("zero-shot backbone %s", cfg.backbone.name)
    return module
