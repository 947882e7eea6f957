"""The ``method`` config group: which recommender a run trains or evaluates, and the checks that keep its
parts together.

``method.kind: llm`` (``method=bigrec``): a LoRA-tuned causal LM (:class:`~msl_rec.training.module.RecLitModule`)
with an LLM loss (lml, msl, msl_ats, sdpo) and an LLM decoder (cbs, cbs_masked, grounding) or a model-free one.
``method.kind: hybrid`` (``method=llara|allmrec``): the same LLM module, loss and decoders, its prompt carrying
a frozen ``method=sasrec`` run's embeddings (``method.encoder_run``; :mod:`msl_rec.training.hybrid`).
``method.kind: sequential`` (``method=sasrec|bert4rec``): an item-ID ``model``
(:class:`~msl_rec.training.sequential.SeqLitModule`) with its own loss (bce, ce, dros), ranked by
``decoder=item_scores`` (or popularity / random). A part of one kind with the other is an error naming both,
before anything is loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from msl_rec.data.build import is_hybrid, is_sequential
from msl_rec.data.teacher import check_teacher_config
from msl_rec.decoding import decoder_target
from msl_rec.models.checkpoint import check_checkpoint_backbone, read_checkpoint
from msl_rec.training.hybrid import encoder_record, resolve_encoder
from msl_rec.training.module import RecLitModule
from msl_rec.training.sequential import SeqLitModule
from msl_rec.utils.config import plain
from msl_rec.utils.registry import LOSSES, SEQUENTIAL_LOSSES, SEQUENTIAL_MODELS

log = logging.getLogger(__name__)

METHOD_KINDS = ("llm", "sequential", "hybrid")
HYBRID_METHODS = ("llara", "allmrec")
SEQUENTIAL_DECODERS = frozenset({"msl_rec.decoding.ItemScoreRanker"})
MODEL_FREE_DECODERS = frozenset({"msl_rec.decoding.PopularityRanker", "msl_rec.decoding.RandomRanker"})


def check_method(cfg: DictConfig, with_loss: bool = True) -> None:
    """Refuse a composition whose loss, model or decoder belongs to the other kind of method, naming the keys.
    ``with_loss`` False (evaluation): the loss is not used, so it is not checked."""
    method = cfg.get("method") or {}
    kind, name = method.get("kind", "llm"), method.get("name", "bigrec")
    if kind not in METHOD_KINDS:
        raise ValueError(f"method.kind={kind!r}: one of {list(METHOD_KINDS)} (configs/method/{name}.yaml)")
    if with_loss:  # a DLLM2Rec teacher goes with its loss (evaluation reads no teacher)
        check_teacher_config(cfg)
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
        if kind == "hybrid" and name not in HYBRID_METHODS:
            raise ValueError(f"method.kind=hybrid: method.name={name!r} is none of {list(HYBRID_METHODS)} "
                             f"(configs/method/{name}.yaml)")
        if model is not None:
            raise ValueError(f"method={name} is an LLM method, but model={SEQUENTIAL_MODELS.get(model, model)} is a "
                             "sequential model; drop model= or use method=sasrec / method=bert4rec")
        if with_loss and loss in SEQUENTIAL_LOSSES:
            raise ValueError(f"method={name} tunes an LLM, but loss={LOSSES[loss]} is a sequential model's loss; use "
                             "loss=lml, msl, msl_ats or sdpo (or method=sasrec for loss=" + LOSSES[loss] + ")")
        if decoder in SEQUENTIAL_DECODERS:
            raise ValueError(f"method={name}: decoder=item_scores ranks a sequential model's scores; use "
                             "decoder=cbs_masked, cbs or grounding for an LLM")


def hybrid_method(cfg: DictConfig, catalog) -> dict:
    """The ``method`` hyper-parameters of a hybrid run: its config plus the encoder record (checkpoint, content,
    catalog) and the first slot id (the tokenizer's size, as the prompt builder uses); the encoder's SHA-256 also
    goes into ``cfg.method`` (so the run's config and eval key record it)."""
    record = encoder_record(cfg.method.get("encoder_run"), cfg.method.name, catalog)
    cfg.method.encoder_sha256 = record["encoder_sha256"]
    return {**plain(cfg.method), **record, "slot_base": len(catalog.tokenizer)}


def build_module(cfg: DictConfig, catalog, sft_ckpt: str | None = None):
    """The LightningModule a training config asks for (its model built; the LLM's backbone in configure_model)."""
    common = {"optim": plain(cfg.optim), "decoder": plain(cfg.get("decoder")), "top_k": list(cfg.top_k),
              "scoring": plain(cfg.scoring)}
    if is_sequential(cfg):
        return SeqLitModule(model=plain(cfg.model), loss=plain(cfg.loss), num_items=catalog.num_items,
                            catalog_sha256=catalog.fingerprint, **common)
    method = hybrid_method(cfg, catalog) if is_hybrid(cfg) else None
    return RecLitModule(backbone=plain(cfg.backbone), loss=plain(cfg.loss), sft_ckpt=sft_ckpt, method=method,
                        **common)


def hybrid_checkpoint_method(cfg: DictConfig, catalog) -> dict:
    """A hybrid checkpoint's ``method`` hyper-parameters, checked against the evaluation: the same method, the
    catalog its slot ids index and the tokenizer size they start from; ``method.encoder_run`` given: the encoder
    read from there (its content must still be the one trained with)."""
    ckpt = read_checkpoint(cfg.ckpt_path)
    saved = dict((ckpt.get("hyper_parameters") or {}).get("method") or {})
    if saved.get("name") != cfg.method.name:
        raise ValueError(f"checkpoint {cfg.ckpt_path} is a method={saved.get('name') or 'bigrec'} run; evaluate it "
                         f"with method={saved.get('name') or 'bigrec'} (or run_dir=<its run folder>)")
    if saved.get("slot_base") != len(catalog.tokenizer):
        raise ValueError(f"checkpoint {cfg.ckpt_path}: its prompts' slot ids start at {saved.get('slot_base')} but "
                         f"this tokenizer has {len(catalog.tokenizer)} tokens: another tokenizer")
    if cfg.method.get("encoder_run"):
        moved = resolve_encoder(cfg.method.encoder_run, cfg.method.name)
        if moved.resolve() != Path(saved.get("encoder_ckpt", "")).resolve():
            log.info("encoder read from %s (the run trained with %s)", moved, saved.get("encoder_ckpt"))
        saved["encoder_ckpt"] = str(moved)
    current = encoder_record(saved["encoder_ckpt"], cfg.method.name, catalog)
    if current["catalog_sha256"] != saved.get("catalog_sha256"):
        raise ValueError(f"checkpoint {cfg.ckpt_path} was trained on another item catalog (its slot ids are other "
                         f"items); evaluate it on the dataset it was trained on")
    cfg.method.encoder_sha256 = saved.get("encoder_sha256")  # the eval key records the encoder by content
    return saved


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
        if is_hybrid(cfg):
            kwargs = {"method": hybrid_checkpoint_method(cfg, catalog)}
        else:
            kwargs = {}
            saved = (read_checkpoint(cfg.ckpt_path).get("hyper_parameters") or {}).get("method") or {}
            if saved.get("kind") == "hybrid":  # its prompts carry encoder slots: BIGRec's prompt would mislead it
                raise ValueError(f"checkpoint {cfg.ckpt_path} is a method={saved.get('name')} run; evaluate it with "
                                 f"method={saved.get('name')} (or run_dir=<its run folder>)")
        module = RecLitModule.load_from_checkpoint(cfg.ckpt_path, map_location="cpu", **kwargs)
        log.info("loaded %s", cfg.ckpt_path)
        return module
    if is_hybrid(cfg):
        raise ValueError(f"method={cfg.method.name} has no zero-shot model (its projector is trained): give "
                         "run_dir=<a training run> or ckpt_path=<its checkpoint>")
    module = RecLitModule(backbone=plain(cfg.backbone), loss=plain(cfg.loss))
    module.configure_model()
    log.info("zero-shot backbone %s", cfg.backbone.name)
    return module
