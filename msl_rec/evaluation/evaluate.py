"""The one metrics function (:func:`summarize`) over prediction rows, and the result it fills."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import DistributedSampler, SequentialSampler

from msl_rec.metrics import compute_metrics
from msl_rec.utils.files import write_atomic


@dataclass
class EvalResult:
    """Metrics and the prediction rows they were computed from.

    Attributes:
        metrics: :func:`summarize`'s ``{"ndcg@k": ..., "hr@k": ..., "target_logp": ...}``.
        predictions: one dict per user (:class:`~msl_rec.evaluation.predict.BatchPredictor`):
            ``user_id``, ``target_id``, ``rank`` (0-based, -1 if the target was not ranked),
            ``ranked_ids`` (the item ids of each ranked sequence, a list of lists because duplicate
            titles share a sequence) and ``scores``; with a model also ``target_logp`` (and
            ``sampled_rank`` when the sampled rank is on); the eval app adds ``row``, the split row index.
        ranks: the ``rank`` of every user, in order.
    """

    metrics: dict[str, float]
    predictions: list[dict] = field(default_factory=list)
    ranks: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @classmethod
    def of(cls, predictions: list[dict], top_k: Sequence[int]) -> EvalResult:
        """The result of ``predictions``: :func:`summarize` at ``top_k`` and the ranks."""
        return cls(metrics=summarize(predictions, top_k), predictions=predictions,
                   ranks=np.asarray([p["rank"] for p in predictions], dtype=np.int64))

    def save(self, folder: str | Path) -> Path:
        """Write ``predictions.jsonl`` and ``metrics.json`` into ``folder`` (created); return it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in self.predictions))
        write_atomic(folder / "metrics.json", json.dumps(self.metrics, indent=2) + "\n")
        return folder


def summarize(predictions: Sequence[Mapping], top_k: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Metrics over prediction rows (means over users, in float64, so order does not matter).

    ``ndcg@k``/``hr@k`` from ``rank``; ``target_logp`` (mean) when every row has one;
    ``target_rank_sampled`` (mean 0-based rank) and ``mrr_sampled`` when every row has a ``sampled_rank``.
    Validation during training and ``msl-rec-eval`` both call this, once over all their users, so the
    same rows give the same floats. An evaluation of no users is an error, not a row of zeros.
    """
    if not predictions:
        raise ValueError("no users were evaluated (n=0): metrics over nothing would read as zeros")
    metrics = compute_metrics(np.asarray([p["rank"] for p in predictions], dtype=np.int64), top_k)
    if all("target_logp" in p for p in predictions):
        logp = np.asarray([p["target_logp"] for p in predictions], dtype=np.float64)
        if not np.isfinite(logp).all():
            raise ValueError(f"target_logp is not finite for {int((~np.isfinite(logp)).sum())} users")
        metrics["target_logp"] = float(logp.mean())
    if all("sampled_rank" in p for p in predictions):
        r = np.asarray([p["sampled_rank"] for p in predictions], dtype=np.float64)
        metrics["target_rank_sampled"] = float(r.mean())
        metrics["mrr_sampled"] = float((1.0 / (r + 1.0)).mean())
    return metrics


def split_rows(loader, batch_idx: int, n: int) -> list[int | None]:
    """The split row index of each of the ``n`` rows of validation batch ``batch_idx`` (None: padding).

    A plain loader reads the split in order: batch ``i`` holds rows ``i * batch_size, ...``.
    ``torch.utils.data.DistributedSampler`` (which Lightning puts under validation loaders in DDP)
    pads the index list to a multiple of the world size W and gives rank ``r`` positions
    ``r, r + W, ...``: local sample ``k`` is row ``k * W + r``, padding iff that is ``>= len(dataset)``.
    Validation sorts its rows by this index before :func:`summarize`, as ``msl-rec-eval`` does.
    """
    if getattr(loader, "batch_size", None) is None:
        raise ValueError("validation needs a DataLoader with a fixed batch_size (to know each row's split index)")
    sampler = getattr(loader, "sampler", None)
    first = batch_idx * loader.batch_size
    if isinstance(sampler, DistributedSampler):
        if sampler.shuffle:
            raise ValueError("validation under a shuffling DistributedSampler: split rows cannot be told apart")
        size, world, rank = len(sampler.dataset), sampler.num_replicas, sampler.rank
        rows = [(first + j) * world + rank for j in range(n)]
        return [r if r < size else None for r in rows]
    if not isinstance(sampler, SequentialSampler):
        raise TypeError(f"validation loader with a {type(sampler).__name__}: expected the split in file order "
                         "(SequentialSampler) or Lightning's DistributedSampler")
    return list(range(first, first + n))
