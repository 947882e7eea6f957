"""Evaluation on one or N processes through Lightning's ``Trainer.predict``.

The eval app groups the split's rows into batches (sorted by prompt length, so little padding) and
hands Lightning a loader whose items are WHOLE batches (``BatchList``). For prediction Lightning
puts an ``UnrepeatedDistributedSampler`` under the loader: rank ``r`` gets batches ``r, r + W, ...``,
no batch twice and none padded in. Each batch therefore has the same rows on one process as on
N, and the predictions (and metrics) are the same as a one-process run's, not just close.

Each batch's rows come from the same :class:`~msl_rec.evaluation.predict.BatchPredictor` validation
uses (:class:`EvalPredictor`). Each rank appends them, keyed by split row index, to its part file of
the prediction store as each batch ends (:class:`PredictionWriter`, Lightning's
``BasePredictionWriter``; :mod:`msl_rec.evaluation.store`); the eval app's rank 0 folds the parts
into one ``predictions.jsonl`` in row order at the end (and at the start of a resumed run).

The terminal shows progress in users, not batches (:class:`UserProgressBar`): ``Evaluating users
3%|▍ | 120/3472 users [elapsed 01:15, ETA 35:00, 1.60 users/s]``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from torch.utils.data import DataLoader, Dataset

from msl_rec.evaluation.store import append_rows

log = logging.getLogger(__name__)


class BatchList(Dataset):
    """Item ``i``: the collated batch of split rows ``batches[i]`` (``dm.eval_dataloader``)."""

    def __init__(self, datamodule, split: str, batches: Sequence[Sequence[int]]):
        if any(len(b) > datamodule.eval_batch_size for b in batches):
            raise ValueError("a batch is larger than data.eval_batch_size")
        self.dm, self.split, self.batches = datamodule, split, [list(b) for b in batches]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return next(iter(self.dm.eval_dataloader(self.split, self.batches[i])))

    def loader(self) -> DataLoader:
        return DataLoader(self, batch_size=1, collate_fn=_only, shuffle=False)


def _only(items: list):
    return items[0]


class EvalPredictor(L.LightningModule):
    """``predict_step`` = ``predictor.predict(model, batch)``: one batch's prediction rows.

    Args:
        predictor: a :class:`~msl_rec.evaluation.predict.BatchPredictor`.
        model: the (peft) network, or None for a decoder without a model; a submodule here, so
            Lightning puts it on the device.
    """

    def __init__(self, predictor, model=None):
        super().__init__()
        self.predictor, self.model = predictor, model

    def predict_step(self, batch, batch_idx: int) -> list[dict]:
        return self.predictor.predict(self.model, batch)


class PredictionWriter(BasePredictionWriter):
    """Append each batch's rows, with their split ``row``, to this rank's part file in ``out_dir``."""

    def __init__(self, out_dir: str | Path, batches: Sequence[Sequence[int]]):
        super().__init__(write_interval="batch")
        self.out_dir, self.batches = Path(out_dir), batches

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        if batch_indices is None or len(batch_indices) != 1:
            raise RuntimeError(f"expected one batch index per loader item, got {batch_indices!r}")
        append_rows(self.out_dir, trainer.global_rank, self.batches[batch_indices[0]], prediction)


def rank_users(batches: Sequence[Sequence[int]], rank: int = 0, world_size: int = 1) -> int:
    """Users (split rows) rank ``rank`` of ``world_size`` decodes: Lightning's
    ``UnrepeatedDistributedSampler`` gives it batches ``rank, rank + world_size, ...``."""
    return sum(len(b) for b in batches[rank::world_size])


class UserProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with ``Trainer.predict`` counted in users (split rows), not batches.

    Shows ``Evaluating users  3%|▍ | 120/3472 users [elapsed 01:15, ETA 35:00, 1.60 users/s]``: the
    users this process decodes in this run (rank 0 of N: its share, ``rank_users``; users resumed from
    an earlier run are not counted), their rate and the time left at that rate. When prediction ends it
    logs one line with the count, the time and the rate (also in the run's log file).
    """

    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} users [elapsed {elapsed}, ETA {remaining}, {rate_noinv_fmt}]"

    def __init__(self, batches: Sequence[Sequence[int]], refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self.batches = batches
        self.users_done = 0
        self._rank_batches = len(batches)  # this process's share, set when prediction starts
        self._t0: float | None = None

    def init_predict_tqdm(self) -> Tqdm:
        # Lightning's settings; unit " users" makes rate_noinv_fmt read "1.60 users/s"
        return Tqdm(desc="Evaluating users", unit=" users", position=2 * self.process_position,
                    disable=self.is_disabled, leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0,
                    bar_format=self.BAR_FORMAT)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_predict_start(trainer, pl_module)
        self.users_done, self._t0 = 0, time.perf_counter()

    def on_predict_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        if not self.has_dataloader_changed(dataloader_idx):
            return
        bar = self.predict_progress_bar
        self._rank_batches = len(self.batches[trainer.global_rank::trainer.world_size])
        bar.reset(total=rank_users(self.batches, trainer.global_rank, trainer.world_size))
        where = f" (rank {trainer.global_rank} of {trainer.world_size})" if trainer.world_size > 1 else ""
        bar.set_description(f"Evaluating users{where}")

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self.users_done += batch_users(outputs, batch)
        bar = self.predict_progress_bar
        if self._should_update(batch_idx + 1, self._rank_batches) and not bar.disable:
            bar.n = self.users_done
            bar.refresh()

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_predict_end(trainer, pl_module)
        seconds = time.perf_counter() - (self._t0 or time.perf_counter())
        log.info("decoded %d users in %.1f s (%.2f users/s)%s", self.users_done, seconds,
                 self.users_done / seconds if seconds > 0 else float("nan"),
                 f" on rank {trainer.global_rank} of {trainer.world_size}" if trainer.world_size > 1 else "")


def batch_users(outputs: Any, batch: Any) -> int:
    """Users in one prediction batch: its prediction rows, else the batch's first dimension."""
    if isinstance(outputs, Sequence):
        return len(outputs)
    if isinstance(batch, Mapping) and "input_ids" in batch:
        return int(batch["input_ids"].shape[0])
    return 0


def progress_callbacks(trainer_cfg: Mapping[str, Any], batches: Sequence[Sequence[int]]) -> list[L.Callback]:
    """``[UserProgressBar(batches)]``, or ``[]`` with ``trainer.enable_progress_bar=false`` (Lightning
    refuses a progress bar callback then)."""
    return [UserProgressBar(batches)] if trainer_cfg.get("enable_progress_bar", True) is not False else []
