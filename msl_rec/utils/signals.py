"""Stopping on SIGTERM (a scheduler's preemption, ``kill``, a driver's stop) without losing work.

Lightning's own handler (lightning/pytorch/trainer/connectors/signal_connector.py, 2.6) only sets
``trainer.received_sigterm``; the fit loops then raise ``SIGTERMException`` (a ``SystemExit`` with
no code: exit 0) at the next batch end without saving anything, and the predict loop never looks at
the flag, so ``msl-rec-eval`` ran on. The callbacks here replace that handler once the loop starts:

- :class:`StopTrainingOnSigterm`: the current optimizer step finishes (all its accumulated
  micro-batches), ``checkpoints/last.ckpt`` is written at that step (the state
  ``callbacks.step_checkpoint`` would save, so ``resume=`` continues mid-epoch with the same data
  order and losses: :class:`~msl_rec.utils.callbacks.MidEpochResume`), then the run stops with exit
  code 143. A SIGTERM during validation lets the validation finish and stops after it (the
  epoch-end ``last.ckpt``); at an epoch's last batch the run also stops after that epoch's validation
  (an epoch without validation: at the next step).
  A run that cannot resume mid-epoch (DDP: MidEpochResume needs one process) stops at the step
  without a new checkpoint, keeping the resumable ``last.ckpt`` of its last save.
- :class:`StopPredictionOnSigterm`: ``msl-rec-eval`` stops after the current batch, whose
  predictions are already appended; exit code 143; the same command continues.

A second SIGTERM kills the process at once (the default action), without saving. DDP: the process
that gets the signal forwards it to the ranks Lightning's launcher started; training ranks agree on
the step to stop at (``reduce_boolean_decision``), so all of them save and stop together.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from msl_rec.utils.callbacks import MidEpochResume

log = logging.getLogger(__name__)

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM  # 143, what a shell reports for a SIGTERM'd process


def _set_lightning_sigterm_flag(trainer: L.Trainer, value: bool) -> None:
    # Lightning exposes only a read-only ``received_sigterm``; its loops stop (after logging the batch)
    # when this flag is set, which is the point where a stop leaves consistent logs
    trainer._signal_connector.received_sigterm = value


def can_resume_mid_epoch(trainer: L.Trainer) -> bool:
    """Whether ``resume=`` can continue this run from a mid-epoch checkpoint: the conditions of
    :class:`~msl_rec.utils.callbacks.MidEpochResume` (one process, a sampler with ``resume_at``) and
    that callback in the run."""

    sampler = getattr(trainer.train_dataloader, "sampler", None)
    return (trainer.world_size == 1 and hasattr(sampler, "resume_at")
            and any(isinstance(cb, MidEpochResume) for cb in trainer.callbacks))


class SigtermRequest:
    """A SIGTERM handler that only records the request (and forwards it to Lightning's child ranks)."""

    def __init__(self) -> None:
        self.requested = False
        self._trainer: L.Trainer | None = None

    def install(self, trainer: L.Trainer) -> None:
        """Replace Lightning's handler (registered just before the loop starts; restored by its teardown)."""
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set in the main thread; Lightning's stays
        self._trainer = trainer
        if trainer.received_sigterm:  # arrived between Lightning's registration and now: take it over
            self.requested = True
            _set_lightning_sigterm_flag(trainer, False)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second SIGTERM: stop at once
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = True
        log.warning("SIGTERM received: stopping at the next safe point (a second SIGTERM stops at once)")
        launcher = getattr(self._trainer.strategy, "launcher", None) if self._trainer is not None else None
        if launcher is not None:
            launcher.kill(signum)  # ranks > 0 started by Lightning (no-op in those ranks themselves)


class StopTrainingOnSigterm(Checkpoint):
    """Training: on SIGTERM, write ``<dirpath>/last.ckpt`` at the next optimizer step (or after the
    running validation) and stop with exit code 143 (see the module docstring).

    A ``Checkpoint`` so that Lightning runs it after every other callback's hooks (checkpoint
    callbacks go last): the file holds the state the run's own checkpoints would.
    """

    def __init__(self, dirpath: str | Path):
        self.path = Path(dirpath) / "last.ckpt"
        self.request = SigtermRequest()
        self.stopped_at: int | None = None  # the optimizer step the run stopped at
        self._step_at_batch_start = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.request.install(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # mid-accumulation: a checkpoint here would drop the accumulated gradients
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the epoch's last step: stop after its validation, the usual epoch-end save point
        self._stop_if_requested(trainer, f"optimizer step {trainer.global_step} (epoch {trainer.current_epoch}, "
                                         f"batch {batch_idx})", mid_epoch=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._stop_if_requested(trainer, f"the validation after optimizer step {trainer.global_step} "
                                             f"(epoch {trainer.current_epoch})")

    def _stop_if_requested(self, trainer: L.Trainer, where: str, mid_epoch: bool = False) -> None:
        # every rank takes the same decision (one SIGTERM may reach the ranks at different batches)
        if self.stopped_at is not None or not trainer.strategy.reduce_boolean_decision(self.request.requested,
                                                                                      all=False):
            return
        self.stopped_at = trainer.global_step
        run_dir = self.path.parent.parent
        if mid_epoch and not can_resume_mid_epoch(trainer):
            # a mid-epoch last.ckpt would replace a resumable one with one resume= refuses
            kept = (f"{self.path} stays at its last save. Continue with: msl-rec-train resume={run_dir}"
                    if self.path.is_file() else "no checkpoint was saved yet: start the run again in a new folder")
            log.warning("SIGTERM: stopping at %s with exit code %d, without a new checkpoint: this run cannot resume "
                        "mid-epoch (world size %d; MidEpochResume needs one process and its callback); %s",
                        where, SIGTERM_EXIT_CODE, trainer.world_size, kept)
        else:
            trainer.save_checkpoint(self.path)
            log.warning("SIGTERM: wrote %s at %s; stopping with exit code %d. Continue with: msl-rec-train resume=%s",
                        self.path, where, SIGTERM_EXIT_CODE, run_dir)
        # Lightning stops after this batch's logging (or at once during validation): SIGTERMException
        _set_lightning_sigterm_flag(trainer, True)


class StopPredictionOnSigterm(L.Callback):
    """``msl-rec-eval``: on SIGTERM stop after the current batch (list it after the prediction writer,
    whose ``on_predict_batch_end`` appends the batch); exit code 143."""

    def __init__(self) -> None:
        self.request = SigtermRequest()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.request.install(trainer)

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.request.requested:
            log.warning("SIGTERM: stopped after prediction batch %d (its predictions are written); exit code %d. "
                        "Run the same command again to continue", batch_idx, SIGTERM_EXIT_CODE)
            raise SIGTERMException(SIGTERM_EXIT_CODE)
