"""Per-step training throughput and learning rate, logged beside the module's own metrics and shown
in the terminal's progress bar (``prog_bar=True``) with the loss and tau."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class TrainThroughput(L.Callback):
    """Logs ``train/tokens_per_s`` (non-padding tokens, negatives included, over the wall time
    since the previous batch ended; not on an epoch's first batch) and ``train/lr`` (the lr the
    batch's step uses) every batch; both are shown in the progress bar."""

    def __init__(self) -> None:
        self._t_last: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Rich's bar (Lightning's default when rich is installed) prints every float as .3f, so an lr
        # of 5e-05 reads 0.000; three significant digits show lr, loss, tau and tokens/s alike
        bar = trainer.progress_bar_callback
        if isinstance(bar, RichProgressBar) and bar.theme.metrics_format == ".3f":
            bar.theme = dataclasses.replace(bar.theme, metrics_format=".3g")  # a copy: the default is shared

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
                          batch_size=bs, prog_bar=True)
        self._t_last = now

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # the lr this batch's gradients will be applied with
        if trainer.optimizers:
            pl_module.log("train/lr", trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False,
                          batch_size=int(batch["input_ids"].shape[0]), prog_bar=True)
