"""Per-step training throughput and learning rate, logged beside the module's own metrics."""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class TrainThroughput(L.Callback):
    """Logs ``train/tokens_per_s`` (non-padding tokens, negatives included, over the wall time
    since the previous batch ended; not on an epoch's first batch) and ``train/lr`` (the lr the
    batch's step uses) every batch."""

    def __init__(self) -> None:
        self._t_last: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t_last = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        bs = int(batch["input_ids"].shape[0])
        tokens = float(batch["attention_mask"].sum())
        if "neg_attention_mask" in batch:
            tokens += float(batch["neg_attention_mask"].sum())
        if self._t_last is not None and now > self._t_last:
            pl_module.log("train/tokens_per_s", tokens / (now - self._t_last), on_step=True, on_epoch=False,
                          batch_size=bs)
        self._t_last = now

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # the lr this batch's gradients will be applied with
        if trainer.optimizers:
            pl_module.log("train/lr", trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False,
                          batch_size=int(batch["input_ids"].shape[0]))
