"""What every recommender's LightningModule shares: validation is the evaluation pipeline.

Each validation batch is predicted by the :class:`~msl_rec.evaluation.predict.BatchPredictor` ``msl-rec-eval``
uses (the run's decoder and ``scoring`` settings); the epoch's rows of all ranks are summarized once
(:func:`~msl_rec.evaluation.evaluate.summarize`), so ``val/*`` are the numbers ``metrics.json`` would hold for
the same users. An LLM (:class:`~msl_rec.training.module.RecLitModule`) and a sequential model
(:class:`~msl_rec.training.sequential.SeqLitModule`) differ in their training step, not here.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch
import torch.distributed as dist

from msl_rec.decoding import build_decoder
from msl_rec.evaluation.evaluate import split_rows, summarize
from msl_rec.evaluation.predict import BatchPredictor
from msl_rec.models import checkpoint as ckpt_state
from msl_rec.utils.precision import autocast_off


class RankingModule(L.LightningModule):
    """Validation by ranking: subclasses set ``hparams.decoder``, ``hparams.top_k``, ``hparams.scoring`` and
    provide :meth:`decoding_model` and :meth:`validation_loss` (used when no decoder is configured)."""

    def __init__(self):
        super().__init__()
        self.decoder = None
        self.predictor: BatchPredictor | None = None  # validation's, built at the first validation
        self._val_rows: list[dict] = []  # this rank's validation prediction rows of the current epoch
        self.val_metrics: dict[str, float] = {}  # the last validation's summarize(), exact (float64)

    # ------------------------------------------------------------------ RNG across resumes
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # every rank's RNG (dropout, sampled negatives): a resumed run draws what the uninterrupted run draws
        checkpoint["rng_states"] = ckpt_state.all_rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._rng_to_restore = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        # restored here, after model building and setup consumed random numbers; each rank its own
        state = ckpt_state.rank_rng_state(getattr(self, "_rng_to_restore", None), self.global_rank,
                                          self.trainer.world_size)
        if state is not None:
            ckpt_state.set_rng_state(state)
        self._rng_to_restore = None

    # ------------------------------------------------------------------ validation
    def decoding_model(self):
        """The model the decoder ranks with."""
        return self.model

    def validation_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _build_predictor(self) -> BatchPredictor | None:
        """Validation's :class:`BatchPredictor` (the decoder and ``scoring`` settings ``msl-rec-eval``
        uses), built once the datamodule's catalog exists; None without a decoder (validate by loss)."""
        if self.predictor is not None or not self.hparams.decoder:
            return self.predictor
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or getattr(dm, "catalog", None) is None:
            return None
        self.decoder = build_decoder(self.hparams.decoder, dm.catalog,
                                     train_targets=getattr(dm, "train_targets", None), top_k=self.hparams.top_k)
        self.predictor = BatchPredictor(self.decoder, dm.catalog, self.hparams.get("scoring"), dm.prompt_preamble)
        return self.predictor

    def on_train_epoch_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "set_epoch"):
            dm.set_epoch(self.current_epoch)

    def on_validation_epoch_start(self) -> None:
        self._val_rows = []

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> list[dict] | None:
        """Decode and score the batch's users as ``msl-rec-eval`` does (the same :class:`BatchPredictor`);
        the rows are kept for :meth:`on_validation_epoch_end`, which computes the metrics once. Returns the
        batch's rows (without DDP padding), for callbacks (``on_validation_batch_end``'s outputs)."""
        bs = int(batch["target_ids"].shape[0])
        predictor = self._build_predictor()
        if predictor is None:
            self.log("val/loss", self.validation_loss(batch), on_epoch=True, sync_dist=True, batch_size=bs)
            return None
        # in the decoder's dtype (float32 by default), not in bf16-mixed's autocast: the same numbers on
        # every machine (utils/precision.py); training keeps its autocast
        with autocast_off(self.device):
            rows = predictor.predict(self.decoding_model() if predictor.needs_model else None, batch)
        loader = self.trainer.val_dataloaders
        loader = loader[0] if isinstance(loader, (list, tuple)) else loader  # one validation loader
        # each row keyed by its split row; DDP's DistributedSampler pads with duplicate rows: dropped
        keep = [{"row": r, **p} for r, p in zip(split_rows(loader, batch_idx, bs), rows) if r is not None]
        self._val_rows.extend(keep)
        return keep

    def on_validation_epoch_end(self) -> None:
        """``val/*`` = :func:`summarize` over every rank's rows of the epoch in split-row order, as
        ``msl-rec-eval`` computes ``metrics.json``: the same users give the same floats
        (:attr:`val_metrics`). Lightning's epoch mean of per-batch values would be float32 and weighted."""
        if self.predictor is None:
            return
        rows = self._val_rows
        if self.trainer.world_size > 1:
            gathered: list[list[dict]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        rows = sorted(rows, key=lambda r: r["row"])
        self._val_rows = []
        if not rows:  # no validation batch ran (limit_val_batches=0): nothing to summarize
            return
        if len({r["row"] for r in rows}) != len(rows):
            raise RuntimeError("validation: a split row was predicted twice across ranks (sampler padding kept?)")
        self.val_metrics = summarize(rows, tuple(self.hparams.top_k))
        for k, v in self.val_metrics.items():
            # already over all ranks (the same on each), so no sync; the float64 values are val_metrics
            self.log(f"val/{k}", v, prog_bar=k.endswith("@10"))
