"""The classes a config may name: msl-rec's allowlist for ``_target_`` and class paths.

A run folder's ``.hydra/config.yaml`` (``resume=``, ``run_dir=``) and a checkpoint's
``hyper_parameters`` are files, and a file is data: the classes named in them are looked up here and
nowhere else. ``hydra.utils.instantiate`` would import and call any importable name with any
arguments (``_target_: os.system``), so every config is checked with :func:`check_targets` before
anything in it is built (losses: :func:`msl_rec.losses.build_loss`, decoders:
:func:`msl_rec.decoding.build_decoder`, the optimizer: :func:`msl_rec.training.optim.build_optimizer`).
This module holds import paths as strings only and imports no component.

To add a component (a loss, a decoder, a callback, a logger, a strategy), add its import path here: one line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from msl_rec.utils.config import plain

LOSSES = {
    "msl_rec.losses.LMLLoss": "lml",
    "msl_rec.losses.MSLLoss": "msl",
    "msl_rec.losses.MSLATSLoss": "msl_ats",
    "msl_rec.losses.SDPOLoss": "sdpo",
    "msl_rec.losses.CELoss": "ce",
    "msl_rec.losses.BCELoss": "bce",
    "msl_rec.losses.DROSLoss": "dros",
    "msl_rec.losses.DLLM2RecLoss": "dllm2rec",
}
"""Loss ``_target_`` -> its ``configs/loss`` name (also how runs are named and grouped)."""

SEQUENTIAL_LOSSES = frozenset({"msl_rec.losses.CELoss", "msl_rec.losses.BCELoss", "msl_rec.losses.DROSLoss",
                               "msl_rec.losses.DLLM2RecLoss"})
"""The losses of the item-ID sequential models (``method=sasrec|bert4rec``); the others train an LLM."""

SEQUENTIAL_MODELS = {"msl_rec.models.SASRec": "sasrec", "msl_rec.models.BERT4Rec": "bert4rec"}
"""Sequential model ``_target_`` (the ``model`` node of ``configs/method/<name>.yaml``) -> its method."""

DECODERS = {
    "msl_rec.decoding.ConstrainedBeamSearch": ("cbs", "cbs_masked"),
    "msl_rec.decoding.PopularityRanker": ("popularity",),
    "msl_rec.decoding.RandomRanker": ("random",),
    "msl_rec.decoding.ItemScoreRanker": ("item_scores",),
    "msl_rec.decoding.Grounding": ("grounding",),
}
"""Decoder ``_target_`` -> the ``configs/decoder`` names that build it (a checkpoint saved before decoders
had a ``_target_`` names only ``name``)."""

ALLOWED_TARGETS = frozenset({
    *LOSSES,
    *DECODERS,
    *SEQUENTIAL_MODELS,
    "torch.optim.AdamW",  # optim._target_, built as a partial over the trainable parameters
    "torch.optim.Adam",  # the sequential models' (L2 through weight_decay, as the released SASRec)
    # Lightning: the trainer, its callbacks, loggers and strategies
    "lightning.pytorch.trainer.Trainer",
    "lightning.pytorch.Trainer",
    "lightning.pytorch.callbacks.ModelCheckpoint",
    "lightning.pytorch.callbacks.RichModelSummary",
    "lightning.pytorch.callbacks.ModelSummary",
    "lightning.pytorch.callbacks.LearningRateMonitor",
    "lightning.pytorch.callbacks.EarlyStopping",
    "lightning.pytorch.loggers.csv_logs.CSVLogger",
    "lightning.pytorch.loggers.CSVLogger",
    "lightning.pytorch.loggers.wandb.WandbLogger",
    "lightning.pytorch.loggers.WandbLogger",
    "lightning.pytorch.strategies.DDPStrategy",
    "lightning.pytorch.strategies.FSDPStrategy",
    "torch.distributed.fsdp.MixedPrecision",
    "hydra.utils.get_object",
    # msl-rec's own components
    "msl_rec.models.fsdp_utils.AdapterFSDPStrategy",
    "msl_rec.models.fsdp_utils.CPUFSDPStrategy",
    "msl_rec.utils.callbacks.BestMetricsWriter",
    "msl_rec.utils.callbacks.MidEpochResume",
    "msl_rec.utils.callbacks.NonFiniteGuard",
    "msl_rec.utils.dashboard.WandbDashboard",
    "msl_rec.utils.schema.SchemaCheck",
    "experiments.probes.LogitProbe",
})
"""Every ``_target_`` a msl-rec config may name."""

ALLOWED_OBJECTS = frozenset({
    "torch.bfloat16", "torch.float16", "torch.float32",
    "transformers.models.llama.modeling_llama.LlamaDecoderLayer",
})
"""Objects a config may name by path: ``hydra.utils.get_object``'s ``path`` and FSDP's
``auto_wrap_policy`` entries."""

PATH_KEYS = ("auto_wrap_policy",)


class ConfigSecurityError(ValueError):
    """A config (or a file's config) names a class or object outside the allowlist."""


def _refuse(key: str, name: Any, source: str, allowed: frozenset) -> None:
    raise ConfigSecurityError(
        f"{source}: {key}={name!r} is not a msl-rec component; nothing in that config was built or run. "
        f"A config may name only the classes in msl_rec/utils/registry.py (e.g. {sorted(allowed)[:4]} ...); "
        "if this is your own trusted class, add its import path there.")


def check_targets(cfg: Any, source: str, prefix: str = "") -> None:
    """Raise :class:`ConfigSecurityError` naming ``source`` and the key when ``cfg`` (a mapping or
    list, nested) names a ``_target_`` not in :data:`ALLOWED_TARGETS`, a ``get_object`` path or an
    ``auto_wrap_policy`` entry not in :data:`ALLOWED_OBJECTS`. Nothing is imported."""
    cfg = plain(cfg, resolve=False)  # checked before any interpolation or resolver runs
    if isinstance(cfg, Mapping):
        target = cfg.get("_target_")
        if target is not None:
            if not isinstance(target, str) or target not in ALLOWED_TARGETS:
                _refuse(f"{prefix}_target_", target, source, ALLOWED_TARGETS)
            if target == "hydra.utils.get_object" and cfg.get("path") not in ALLOWED_OBJECTS:
                _refuse(f"{prefix}path", cfg.get("path"), source, ALLOWED_OBJECTS)
        for key, value in cfg.items():
            if key in PATH_KEYS and isinstance(value, Sequence) and not isinstance(value, str):
                for i, item in enumerate(value):
                    if item not in ALLOWED_OBJECTS:
                        _refuse(f"{prefix}{key}[{i}]", item, source, ALLOWED_OBJECTS)
            elif isinstance(value, (Mapping, list, tuple)):
                check_targets(value, source, f"{prefix}{key}.")
    elif isinstance(cfg, (list, tuple)):
        for i, item in enumerate(cfg):
            check_targets(item, source, f"{prefix}[{i}].")

