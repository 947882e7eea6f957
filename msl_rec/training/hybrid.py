"""Hybrid methods' training pieces (``method.kind: hybrid``: LLaRA, A-LLMRec) around the shared LLM module.

The method itself lives in :mod:`msl_rec.models.hybrid` (the slot embedding) and
:class:`~msl_rec.data.prompts.SlotPromptBuilder` (the prompt); here: which encoder a run reads
(:func:`encoder_record`, :func:`load_encoder`: a ``method=sasrec`` checkpoint, checked by content and
catalog), the slot parts an S-DPO run takes from its SFT run (:func:`load_sft_slots`), LLaRA's curriculum
switch and A-LLMRec's stage 1 on the run's training rows (:func:`run_stage1`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from msl_rec.data.sequences import TitleCatalog
from msl_rec.evaluation.runner import best_checkpoint
from msl_rec.models import checkpoint as ckpt_state
from msl_rec.models.hybrid import SLOT_PARTS, SlotEmbedding, align_items
from msl_rec.models.inference import CausalLMInference
from msl_rec.training.sequential import SeqLitModule
from msl_rec.utils.files import file_sha256

log = logging.getLogger(__name__)

ENCODER_MODELS = ("msl_rec.models.SASRec",)


def resolve_encoder(run: str | None, method: str) -> Path:
    """The checkpoint of ``method.encoder_run`` (a ``method=sasrec`` run folder: its best checkpoint; or a .ckpt)."""
    if not run:
        raise ValueError(f"method={method} reads a frozen SASRec: pass method.encoder_run=<a `msl-rec-train "
                         "method=sasrec` run folder or its .ckpt> (e.g. results/baselines_cpu/sasrec.ckpt)")
    path = Path(run)
    if path.is_dir():
        return best_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(f"method.encoder_run={run}: no such run folder or checkpoint; train one with "
                                "`msl-rec-train method=sasrec` and pass its folder")
    return path


def encoder_record(run: str | None, method: str, catalog) -> dict[str, Any]:
    """What a hybrid run records of its encoder (``method.encoder_ckpt``, ``encoder_sha256``, ``catalog_sha256``):
    the checkpoint by content, and the catalog whose item indices the prompt's slot ids use."""
    ckpt = resolve_encoder(run, method)
    return {"encoder_ckpt": str(ckpt), "encoder_sha256": file_sha256(ckpt),
            "catalog_sha256": TitleCatalog(catalog.titles).fingerprint}


def load_encoder(method: Mapping[str, Any]) -> torch.nn.Module:
    """The frozen SASRec of ``method.encoder_ckpt``, refused unless its bytes hash to ``encoder_sha256`` and it
    was trained on the catalog ``catalog_sha256`` (item indices = slot ids)."""
    path, name = Path(method["encoder_ckpt"]), method.get("name")
    if not path.is_file():
        raise FileNotFoundError(f"method={name}: its encoder checkpoint {path} is missing; pass "
                                "method.encoder_run=<that checkpoint's new place> (its SHA-256 is checked)")
    sha = file_sha256(path)
    if sha != method.get("encoder_sha256"):
        raise ckpt_state.CheckpointError(
            f"method={name}: encoder checkpoint {path} has SHA-256 {sha[:12]}.. but this model was trained with "
            f"{str(method.get('encoder_sha256'))[:12]}..: another SASRec would put other embeddings in the slots; "
            "pass the encoder the run was trained with (method.encoder_run)")
    enc = SeqLitModule.load_from_checkpoint(path, map_location="cpu")
    target = (enc.hparams.get("model") or {}).get("_target_")
    if target not in ENCODER_MODELS:
        raise ValueError(f"method={name}: encoder {path} is a {target}; hybrid methods read a SASRec "
                         "(`msl-rec-train method=sasrec`)")
    if enc.hparams.get("catalog_sha256") != method.get("catalog_sha256"):
        raise ckpt_state.CheckpointError(f"method={name}: encoder {path} was trained on another item catalog than "
                                         "this dataset's (its item indices are not this prompt's slot ids); pass "
                                         "method.encoder_run=<a `msl-rec-train method=sasrec` run on this dataset>")
    model = enc.model.eval()
    model.requires_grad_(False)
    return model


def load_sft_slots(slots: SlotEmbedding, sft: str, method: Mapping[str, Any]) -> None:
    """S-DPO from a hybrid SFT run: its slot parts (projectors, aligner) loaded and frozen, so the reference
    (adapter off) is the SFT model exactly. Refused when the SFT run is another method or read another encoder."""
    ckpt = ckpt_state.read_checkpoint(sft)
    saved = (ckpt.get("hyper_parameters") or {}).get("method") or {}
    for key in ("name", "encoder_sha256"):
        if saved.get(key) != method.get(key):
            raise ckpt_state.CheckpointError(f"SFT checkpoint {sft}: method {key} {saved.get(key)!r} but this run has "
                                             f"{method.get(key)!r}; S-DPO starts from an LML run of the same method "
                                             "and encoder")
    marker = f".{SLOT_PARTS}."
    state = {ckpt_state.canonical_key(k).split(marker, 1)[1]: v for k, v in ckpt["state_dict"].items()
             if marker in k}
    own = {n: p for n, p in slots.parts.named_parameters() if not n.startswith("encoder.")}
    if set(state) != set(own):
        raise ckpt_state.CheckpointError(f"SFT checkpoint {sft}: slot parts {sorted(state)[:3]} do not match the "
                                         f"model's {sorted(own)[:3]}")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(state[n].to(p.dtype))
            p.requires_grad_(False)


def run_stage1(slots: SlotEmbedding, model, datamodule, stage1: Mapping[str, Any], cache_dir: str | None) -> None:
    """A-LLMRec's stage 1 before stage 2's first step: title text embeddings (the base LLM's last-token
    states, BIGRec's grounding embeddings, kept on disk under ``cache_dir``) aligned with the encoder's item
    embeddings over the run's training rows (:func:`~msl_rec.models.hybrid.align_items`)."""
    catalog = datamodule.catalog
    titles = TitleCatalog(catalog.titles)
    texts = catalog.bare_title_ids()  # one per title group, the catalog's order
    runner = CausalLMInference(dtype="float32").bind(model)
    was = slots.use_items
    with torch.no_grad():
        grouped = runner.text_embeddings(texts, base=True, cache_key="titles", store=cache_dir)
    slots.use_items = was
    group_of = {i: g for g, items in enumerate(catalog.seq_items) for i in items}
    text = grouped[torch.tensor([group_of[int(i)] for i in titles.item_ids])].float().cpu()
    samples = datamodule.split_samples("train")
    enc = slots.parts["encoder"]
    L = enc.max_len
    hist = [titles.indices(s.history)[-L:] for s in samples]
    history = torch.full((len(hist), L), enc.padding_index, dtype=torch.long)
    for b, h in enumerate(hist):
        history[b, :len(h)] = torch.tensor(h)
    lengths = torch.tensor([len(h) for h in hist])
    targets = torch.tensor(titles.indices([s.target for s in samples]))
    dev = next(slots.parts.parameters()).device
    with torch.enable_grad():
        losses = align_items(slots, text.to(dev), history.to(dev), lengths.to(dev), targets.to(dev), stage1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for p in slots.parts["aligner"].parameters():  # every rank keeps rank 0's aligner (GPU kernels may differ)
            torch.distributed.broadcast(p.data, src=0)
    log.info("A-LLMRec stage 1: %d training rows, %d epochs; last epoch losses %s", len(samples),
             int(stage1.get("epochs", 10)), {k: round(v, 4) for k, v in losses.items()})
