"""The LightningModule of the sequential recommenders (``method=sasrec|bert4rec``): an item-ID model trained
with its own loss (``loss=bce|ce|dros``), validated by the same pipeline as the LLM runs
(:class:`~msl_rec.training.base.RankingModule`: full-catalog ranking, ``summarize``).

Built from plain data (the ``model`` and ``loss`` nodes, the optimiser, the catalog's item ids), so
``save_hyperparameters`` captures everything and ``load_from_checkpoint`` rebuilds the same network; the
checkpoint holds the whole (small) model. The catalog a checkpoint was trained on is recorded by the SHA-256
of its item ids: a checkpoint evaluated on another catalog is refused (its item indices would mean other items).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from msl_rec.data.teacher import check_teacher_pairing
from msl_rec.losses import build_loss
from msl_rec.models import checkpoint as ckpt_state
from msl_rec.training.base import RankingModule
from msl_rec.training.optim import build_lr_schedule, build_optimizer
from msl_rec.utils.config import plain
from msl_rec.utils.registry import SEQUENTIAL_LOSSES, SEQUENTIAL_MODELS, ConfigSecurityError, check_targets

log = logging.getLogger(__name__)


def build_sequential_model(model_cfg: Mapping[str, Any], num_items: int) -> torch.nn.Module:
    """The model a ``model`` node names (``_target_`` from :data:`SEQUENTIAL_MODELS`) for ``num_items`` items."""
    cfg = dict(plain(model_cfg))
    target = cfg.get("_target_")
    if target not in SEQUENTIAL_MODELS:
        raise ConfigSecurityError(f"model._target_={target!r} is not a msl-rec sequential model; choose one of "
                                  f"{sorted(SEQUENTIAL_MODELS)}")
    check_targets(cfg, source="model config", prefix="model.")
    cfg.pop("name", None)
    return instantiate(cfg, num_items=int(num_items), _convert_="all")


class SeqLitModule(RankingModule):
    """An item-ID sequential recommender and its loss.

    Args:
        model: the ``model`` node (``_target_`` SASRec / BERT4Rec + its settings).
        loss: a sequential ``configs/loss`` node (ce, bce, dros; dllm2rec: distilled from the data module's
            teacher lists, ``method.teacher_run``).
        num_items: the catalog's item count; catalog_sha256: its :attr:`~msl_rec.data.sequences.TitleCatalog.fingerprint`
            (what the model's item indices mean).
        optim, decoder, top_k, scoring: as :class:`~msl_rec.training.module.RecLitModule`.
    """

    def __init__(self, model: Mapping[str, Any], loss: Mapping[str, Any], num_items: int, catalog_sha256: str,
                 optim: Mapping[str, Any] | None = None, decoder: Mapping[str, Any] | None = None,
                 top_k: Sequence[int] = (1, 5, 10), scoring: Mapping[str, Any] | None = None):
        super().__init__()
        target = plain(loss).get("_target_")
        if target not in SEQUENTIAL_LOSSES:
            raise ValueError(f"loss._target_={target!r} is an LLM loss; a sequential model (model._target_="
                             f"{plain(model).get('_target_')}) trains with loss=bce, ce, dros or dllm2rec")
        self.save_hyperparameters({"model": plain(model), "loss": plain(loss), "optim": plain(optim) or {},
                                   "decoder": plain(decoder), "top_k": list(top_k), "scoring": plain(scoring),
                                   "num_items": int(num_items), "catalog_sha256": str(catalog_sha256)})
        self.model = build_sequential_model(self.hparams.model, int(num_items))
        self.loss = build_loss(self.hparams.loss)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location: Any = "cpu", **kwargs) -> SeqLitModule:
        """Lightning's loader with ``weights_only=True``; its classes checked against the allowlist first."""
        path = Path(checkpoint_path)
        ckpt = ckpt_state.read_checkpoint(path)
        hp = ckpt.get("hyper_parameters") or {}
        check_targets(hp, source=f"checkpoint {path} (hyper_parameters)")
        if "num_items" not in hp or "model" not in hp:
            raise ckpt_state.CheckpointError(f"checkpoint {path}: not a sequential model's checkpoint (no model / "
                                             "num_items in its hyper_parameters); evaluate it with its own method=")
        kwargs.setdefault("weights_only", True)
        return super().load_from_checkpoint(path, map_location=map_location, **kwargs)

    def check_catalog(self, catalog, source: str) -> None:
        """Refuse a catalog other than the one the model was trained on (``catalog``: a TitleCatalog)."""
        if catalog.num_items != self.hparams.num_items or catalog.fingerprint != self.hparams.catalog_sha256:
            raise ckpt_state.CheckpointError(
                f"{source}: the model was trained on a catalog of {self.hparams.num_items} items (sha256 "
                f"{self.hparams.catalog_sha256[:12]}), this dataset's has {catalog.num_items} (sha256 "
                f"{catalog.fingerprint[:12]}): its item indices would name other items; evaluate it on "
                "the dataset it was trained on")

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        self.check_catalog(dm.catalog, "the training data")
        if stage == "fit" and hasattr(self.loss, "set_item_counts"):
            # DROS's nominal distribution: the training targets' item counts (recomputed at every start)
            self.loss.set_item_counts(dm.train_item_counts())
        if stage == "fit":
            self.join_teacher(dm)

    def join_teacher(self, dm) -> None:
        """DLLM2Rec: a loss that reads a teacher gets the data module's lists in every training batch (joined
        here, before the first step); a teacher without such a loss, or such a loss without one, is an error."""
        needs = bool(getattr(self.loss, "needs_teacher", False))
        teacher_run = getattr(dm, "teacher_run", None)
        check_teacher_pairing(needs, teacher_run, f"loss._target_={self.hparams.loss.get('_target_')}")
        if not needs:
            return
        teacher = dm.teacher_lists()
        length, row = teacher.shortest()
        if length < self.loss.candidate_topk:
            raise ValueError(f"{teacher.source}: training row {row} has a list of {length} items, fewer than "
                             f"loss.candidate_topk={self.loss.candidate_topk}; lower loss.candidate_topk or rank "
                             "more items with the teacher (decoder.num_beams)")

    def forward(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, num_items) scores of every item after each history."""
        return self.model(history, lengths)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        scores, targets = self.model.train_scores(batch)
        if getattr(self.loss, "needs_teacher", False):  # DLLM2Rec: each row's teacher list (join_teacher)
            loss, metrics = self.loss(scores, targets, batch["teacher_items"], batch["teacher_distance"])
        else:
            loss, metrics = self.loss(scores, targets)
        bs = int(batch["targets"].shape[0])
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        for k, v in (metrics or {}).items():
            if k != "loss":
                self.log(f"train/{k}", float(v), on_step=True, on_epoch=False, batch_size=bs)
        return loss

    def validation_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.loss(self.model(batch["history"], batch["lengths"]), batch["targets"])[0]

    def configure_optimizers(self):
        o = dict(self.hparams.optim or {})
        opt = build_optimizer(self.model.parameters(), o)
        try:
            total = int(self.trainer.estimated_stepping_batches)
        except (RuntimeError, OverflowError):
            total = None
        return {"optimizer": opt, "lr_scheduler": {"scheduler": build_lr_schedule(opt, o, total), "interval": "step"}}
