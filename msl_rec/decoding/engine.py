"""Evaluation on one or N processes through Lightning's ``Trainer.predict``.

The eval app groups the split's rows into batches (sorted by prompt length, so little padding) and
hands Lightning a loader whose items are WHOLE batches (``BatchList``). For prediction Lightning
puts an ``UnrepeatedDistributedSampler`` under the loader: rank ``r`` gets batches ``r, r + W, ...``,
no batch twice and none padded in. Each batch therefore has the same rows on one process as on
N, and the predictions (and metrics) are the same as a one-process run's, not just close.

Each rank appends its rows, keyed by split row index, to ``predictions.part<rank>.jsonl`` as each
batch ends (:class:`PredictionWriter`, Lightning's ``BasePredictionWriter``); the eval app's rank 0
folds the parts into one ``predictions.jsonl`` in row order at the end (and at the start of a
resumed run, after a kill).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from msl_rec.decoding.evaluate import predict_batch

PART_GLOB = "predictions.part*.jsonl"


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
    """``predict_step`` = decode one batch (and score its targets): the prediction rows."""

    def __init__(self, decoder, model, catalog, scorer=None):
        super().__init__()
        self.decoder, self.model, self.catalog, self.scorer = decoder, model, catalog, scorer

    def predict_step(self, batch, batch_idx: int) -> list[dict]:
        return predict_batch(self.decoder, self.model, batch, self.catalog, self.scorer)


class PredictionWriter(BasePredictionWriter):
    """Append each batch's rows, with their split ``row``, to ``predictions.part<rank>.jsonl``."""

    def __init__(self, out_dir: str | Path, batches: Sequence[Sequence[int]]):
        super().__init__(write_interval="batch")
        self.out_dir, self.batches = Path(out_dir), batches

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        if batch_indices is None or len(batch_indices) != 1:
            raise RuntimeError(f"expected one batch index per loader item, got {batch_indices!r}")
        rows = self.batches[batch_indices[0]]
        if len(rows) != len(prediction):
            raise RuntimeError(f"batch {batch_indices[0]}: {len(prediction)} predictions for {len(rows)} rows")
        path = self.out_dir / f"predictions.part{trainer.global_rank}.jsonl"
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps({"row": int(r), **p}) + "\n" for r, p in zip(rows, prediction))
            f.flush()
