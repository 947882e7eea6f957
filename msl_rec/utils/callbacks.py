"""Callbacks and the checkpoint writer the train app adds (configs/callbacks/default.yaml, msl_rec/train.py)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from msl_rec.utils.files import write_atomic


class BestMetricsWriter(L.Callback):
    """Write ``metrics.json`` for the validation epoch with the best ``monitor`` (the selection metric).

    Values are the epoch-level, rank-synced ``val/*`` metrics and the monitor, ``val/`` keys without the ``val/`` prefix
    (``ndcg@5``, ``hr@10`` ...), plus ``epoch``, ``step`` and ``monitor``, and ``decode_dtype`` (the
    validation decoder's ``compute_dtype``, e.g. ``"float32"``, when it has one); when the fit ends,
    ``best_ckpt`` (the monitored ``ModelCheckpoint``'s file, relative to ``dirpath``) is added. The
    monitored ``ModelCheckpoint`` must use the same ``monitor`` and ``mode`` (both interpolate
    ``monitor`` in configs/train.yaml), so the file and the kept checkpoint are the same epoch.
    Rank 0 writes into ``dirpath``.
    """

    def __init__(self, dirpath: str, monitor: str = "val/ndcg@10", mode: str = "max", filename: str = "metrics.json"):
        if mode not in ("max", "min"):
            raise ValueError(f"best_metrics.mode={mode!r}: expected max or min")
        self.dirpath = Path(dirpath)
        self.path = self.dirpath / filename
        self.monitor, self.mode = monitor, mode
        self.best = -math.inf if mode == "max" else math.inf
        self.best_metrics: dict[str, float] = {}  # full keys (val/ndcg@10 ...), epoch, step
        self.decode_dtype: str | None = None  # the dtype the best epoch's validation decoded in

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.monitor and (cb.monitor, cb.mode) != (self.monitor, self.mode):
                raise ValueError(f"the checkpoint selects by {cb.monitor} ({cb.mode}) but metrics.json by "
                                 f"{self.monitor} ({self.mode}); set both through monitor.metric / monitor.mode")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if not (value > self.best if self.mode == "max" else value < self.best):
            return
        self.best = value
        self.best_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.best_metrics[self.monitor] = value
        # the module's exact (float64) summarize() values, as msl-rec-eval writes them; Lightning logs float32
        self.best_metrics.update({f"val/{k}": float(v) for k, v in getattr(pl_module, "val_metrics", {}).items()})
        self.best_metrics.update(epoch=trainer.current_epoch, step=trainer.global_step)
        self.decode_dtype = getattr(getattr(pl_module, "decoder", None), "compute_dtype", None)
        if trainer.is_global_zero:
            self._write()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        best = [cb.best_model_path for cb in trainer.checkpoint_callbacks
                if isinstance(cb, ModelCheckpoint) and cb.monitor == self.monitor and cb.best_model_path]
        if trainer.is_global_zero and self.best_metrics and best:
            self._write(best_ckpt=best[0])

    def _write(self, best_ckpt: str | None = None) -> None:
        out: dict[str, Any] = {k.removeprefix("val/"): v for k, v in self.best_metrics.items()}
        out["monitor"] = {"metric": self.monitor, "mode": self.mode}
        if self.decode_dtype:
            out["decode_dtype"] = self.decode_dtype
        if best_ckpt:
            p = Path(best_ckpt).resolve()
            root = self.dirpath.resolve()
            out["best_ckpt"] = str(p.relative_to(root)) if root in p.parents else str(p)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(out, indent=2) + "\n")

    def state_dict(self) -> dict:
        return {"best": self.best, "best_metrics": dict(self.best_metrics), "decode_dtype": self.decode_dtype}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict.get("best", self.best)
        self.best_metrics = dict(state_dict.get("best_metrics", self.best_metrics))
        self.decode_dtype = state_dict.get("decode_dtype", self.decode_dtype)


class NonFiniteGuard(L.Callback):
    """Stop the run on a non-finite training loss or non-finite trainable weights.

    The loss is checked before its backward pass, the trainable weights after each optimizer step
    (LoRA only: cheap), so no checkpoint (saved after this callback's ``on_train_batch_end``, as
    Lightning orders checkpoint callbacks last) ever holds NaN weights. Every rank takes the same
    decision (``reduce_boolean_decision``), so DDP/FSDP ranks stop together instead of hanging.
    Lightning's own checks do not cover this: ``EarlyStopping(check_finite=True)`` looks at the
    monitored validation metric only, and ``detect_anomaly`` is far too slow to leave on.
    """

    def _stop_unless(self, trainer: L.Trainer, finite: bool, what: str) -> None:
        if trainer.strategy.reduce_boolean_decision(bool(finite), all=True):
            return
        loop = trainer.fit_loop
        raise FloatingPointError(
            f"{what} at optimizer step {trainer.global_step} (epoch {trainer.current_epoch}, batch "
            f"{loop.epoch_loop.batch_idx}); the run stops, no checkpoint of this state is written. Lower optim.lr "
            f"or set trainer.gradient_clip_val, then start again or resume= the run from its last good last.ckpt")

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        self._stop_unless(trainer, finite, f"non-finite training loss ({float(loss.detach().float().mean()):g})")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        params = [p.detach() for p in pl_module.parameters() if p.requires_grad]
        finite = bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True
        self._stop_unless(trainer, finite, "non-finite trainable weights after the update")


class MidEpochResume(L.Callback):
    """After a resume from a mid-epoch checkpoint (``callbacks.step_checkpoint.every_n_train_steps``),
    continue the epoch's data order where it stopped.

    Lightning restores the loops' batch counters but, for a map-style dataset, starts the epoch's
    sampler from the beginning (only a torchdata ``StatefulDataLoader`` would resume itself). The
    train sampler's order is a pure function of (seed, epoch), so skipping the batches already
    done (``batch_progress.current.processed`` at the save) gives the uninterrupted run's batches.
    The sampler must offer ``resume_at(position)`` (``EpochShuffleSampler`` does).
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is None:
            return
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if not 0 < done < trainer.num_training_batches:
            return  # saved at an epoch's end: the next epoch starts from its beginning
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if trainer.world_size != 1 or not hasattr(sampler, "resume_at"):
            raise RuntimeError(f"{trainer.ckpt_path} was saved mid-epoch ({done} batches in), but this run's train "
                               f"sampler ({type(sampler).__name__}, world size {trainer.world_size}) cannot resume "
                               "there; resume from an epoch-end checkpoint instead")
        sampler.resume_at(done * loader.batch_size)


class VerifiedCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint writer, then a check that the file really was written.

    Lightning's ``_atomic_save`` (lightning/fabric/utilities/cloud_io.py) catches ``PermissionError``
    and returns, so an unwritable ``checkpoints/`` folder lost every checkpoint while the run
    exited 0. Here a missing file, or one left unchanged by the write, raises ``OSError`` naming it.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: fsspec reports its own errors
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        before = _stat(path)
        try:
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        except OSError as err:
            raise OSError(f"could not write the checkpoint {path}: {err}; free disk space or make its folder "
                          "writable, then resume= the run") from err
        after = _stat(path)
        if after is None or after == before:
            raise OSError(f"could not write the checkpoint {path} (the write left no new file; is its folder "
                          "writable?); fix the folder, then resume= the run")


def _stat(path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)
