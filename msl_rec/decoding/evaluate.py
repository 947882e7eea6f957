"""Run a decoder over batches and score its rankings (NDCG@K, HR@K)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from msl_rec.decoding.base import Decoder
from msl_rec.metrics import compute_metrics, rank_of_target


@dataclass
class EvalResult:
    """What :func:`evaluate` returns.

    Attributes:
        metrics: ``{"ndcg@k": ..., "hr@k": ...}`` for each requested k.
        predictions: one dict per user: ``user_id``, ``target_id``, ``rank`` (0-based, -1 if the
            target was not ranked), ``ranked_ids`` (the item ids of each ranked sequence, a list of
            lists because duplicate titles share a sequence) and ``scores``.
        ranks: the ``rank`` of every user, in order.
    """

    metrics: dict[str, float]
    predictions: list[dict] = field(default_factory=list)
    ranks: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def save(self, folder: str | Path) -> Path:
        """Write ``predictions.jsonl`` and ``metrics.json`` into ``folder`` (created); return it."""
        return save_eval_result(self, folder)


def save_eval_result(result: EvalResult, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "predictions.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p) + "\n" for p in result.predictions)
    (folder / "metrics.json").write_text(json.dumps(result.metrics, indent=2) + "\n", encoding="utf-8")
    return folder


def load_predictions(path: str | Path) -> list[dict]:
    """The rows of a ``predictions.jsonl``; a torn last line (an interrupted write) is dropped."""
    path = Path(path)
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
        if "rank" not in row:
            raise ValueError(f"{path}: line {i + 1} has no 'rank' field")
        rows.append(row)
    return rows


def merge_predictions(folders: Sequence[str | Path], top_k: Sequence[int] = (1, 5, 10)) -> EvalResult:
    """One result from the ``predictions.jsonl`` of several evaluations (e.g. the shards of a split).

    Metrics are means over users, so they are recomputed from the concatenated ranks, not averaged.
    """
    predictions = [row for f in folders for row in load_predictions(Path(f) / "predictions.jsonl")]
    ranks = np.asarray([row["rank"] for row in predictions], dtype=np.int64)
    return EvalResult(metrics=compute_metrics(ranks, top_k), predictions=predictions, ranks=ranks)


def evaluate(decoder: Decoder, model, batches: Iterable[dict], catalog, top_k: Sequence[int] = (1, 5, 10),
             progress: bool = False, on_batch: Callable[[list[dict]], None] | None = None,
             total: int | None = None) -> EvalResult:
    """Rank every batch's users with ``decoder`` and compute the metrics at ``top_k``.

    The model (if the decoder needs one) runs in eval mode under ``torch.no_grad``; its previous
    training mode is restored afterwards. ``on_batch`` gets each batch's prediction rows as soon as
    they exist (the eval app appends them to ``predictions.jsonl``, so a stopped run can resume).
    """
    if decoder.needs_model and model is None:
        raise ValueError(f"{type(decoder).__name__} needs a model, got None")
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="evaluate", unit="batch", total=total)
    was_training = bool(getattr(model, "training", False))
    if model is not None:
        model.eval()
    predictions, ranks = [], []
    try:
        with torch.no_grad() if model is not None else contextlib.nullcontext():
            for batch in batches:
                rankings = decoder.rank(model, batch)
                rows = []
                for user, target, ranking in zip(batch["user_ids"].tolist(), batch["target_ids"].tolist(), rankings):
                    ranked_ids = [list(catalog.seq_items[s]) for s, _ in ranking]
                    r = rank_of_target(target, ranked_ids)
                    ranks.append(r)
                    rows.append({"user_id": int(user), "target_id": int(target), "rank": r,
                                 "ranked_ids": ranked_ids, "scores": [float(sc) for _, sc in ranking]})
                predictions.extend(rows)
                if on_batch is not None:
                    on_batch(rows)
    finally:
        if model is not None and was_training:
            model.train()
    ranks_arr = np.asarray(ranks, dtype=np.int64)
    return EvalResult(metrics=compute_metrics(ranks_arr, top_k), predictions=predictions, ranks=ranks_arr)
