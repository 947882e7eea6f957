"""Callbacks the train app adds by config (configs/callbacks/default.yaml)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L


class BestMetricsWriter(L.Callback):
    """Write ``metrics.json`` for the validation epoch with the best ``monitor`` (the paper's choice).

    Values are the epoch-level, rank-synced ``val/*`` metrics, keys without the ``val/`` prefix
    (``ndcg@5``, ``hr@10`` ...), plus ``epoch`` and ``step``. Rank 0 writes into ``dirpath``.
    """

    def __init__(self, dirpath: str, monitor: str = "val/ndcg@5", mode: str = "max", filename: str = "metrics.json"):
        self.path = Path(dirpath) / filename
        self.monitor, self.mode = monitor, mode
        self.best = -math.inf if mode == "max" else math.inf

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if not (value > self.best if self.mode == "max" else value < self.best):
            return
        self.best = value
        if trainer.is_global_zero:
            metrics = {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items()
                       if k.startswith("val/")}
            metrics.update(epoch=trainer.current_epoch, step=trainer.global_step)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(metrics, indent=2) + "\n")

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict.get("best", self.best)
