"""Run a decoder over batches and score its rankings (NDCG@K, HR@K, and the sensitive signal)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from msl_rec.decoding.base import Decoder
from msl_rec.decoding.scoring import TargetScorer
from msl_rec.metrics import compute_metrics, rank_of_target
from msl_rec.utils.files import write_atomic


@dataclass
class EvalResult:
    """What :func:`evaluate` returns.

    Attributes:
        metrics: ``{"ndcg@k": ..., "hr@k": ...}`` for each requested k.
        predictions: one dict per user: ``user_id``, ``target_id``, ``rank`` (0-based, -1 if the
            target was not ranked), ``ranked_ids`` (the item ids of each ranked sequence, a list of
            lists because duplicate titles share a sequence) and ``scores``; with a model also
            ``target_logp`` and ``sampled_rank`` (:mod:`msl_rec.decoding.scoring`); the eval app
            adds ``row``, the split row index.
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
    write_atomic(folder / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in result.predictions))
    write_atomic(folder / "metrics.json", json.dumps(result.metrics, indent=2) + "\n")
    return folder


def summarize(predictions: Sequence[Mapping], top_k: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Metrics over prediction rows (means over users, so order does not matter).

    ``ndcg@k``/``hr@k`` from ``rank``; ``target_logp`` (mean) when every row has one;
    ``target_rank_sampled`` (mean 0-based rank) and ``mrr_sampled`` when every row has a ``sampled_rank``.
    An evaluation of no users is an error, not a row of zeros.
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
    if all("row" in p for p in predictions):
        predictions.sort(key=lambda p: p["row"])
    ranks = np.asarray([row["rank"] for row in predictions], dtype=np.int64)
    return EvalResult(metrics=summarize(predictions, top_k), predictions=predictions, ranks=ranks)


def predict_batch(decoder: Decoder, model, batch: Mapping, catalog, scorer: TargetScorer | None = None) -> list[dict]:
    """One prediction row per user of ``batch`` (see :class:`EvalResult`); no grad needed."""
    rankings = decoder.rank(model, batch)
    extra = scorer.score(model, batch) if scorer is not None else [{} for _ in rankings]
    rows = []
    for user, target, ranking, more in zip(batch["user_ids"].tolist(), batch["target_ids"].tolist(), rankings, extra):
        ranked_ids = [list(catalog.seq_items[s]) for s, _ in ranking]
        rows.append({"user_id": int(user), "target_id": int(target), "rank": rank_of_target(target, ranked_ids),
                     "ranked_ids": ranked_ids, "scores": [float(sc) for _, sc in ranking], **more})
    return rows


def evaluate(decoder: Decoder, model, batches: Iterable[dict], catalog, top_k: Sequence[int] = (1, 5, 10),
             progress: bool = False, on_batch: Callable[[list[dict]], None] | None = None,
             total: int | None = None, scoring: Mapping | None = None) -> EvalResult:
    """Rank every batch's users with ``decoder`` and compute the metrics at ``top_k``.

    With a model, also the sensitive signal (``target_logp``, ``target_rank_sampled``,
    ``mrr_sampled``; :mod:`msl_rec.decoding.scoring`) under the decoder's masking; ``scoring`` holds
    :class:`TargetScorer`'s settings (``num_negatives``, ``seed``, ``chunk_size``; ``target_logp:
    false`` turns it off). The model runs in eval mode under ``torch.no_grad``; its previous training
    mode is restored afterwards. ``on_batch`` gets each batch's prediction rows as soon as they exist.
    """
    if decoder.needs_model and model is None:
        raise ValueError(f"{type(decoder).__name__} needs a model, got None")
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="evaluate", unit="batch", total=total)
    was_training = bool(getattr(model, "training", False))
    if model is not None:
        model.eval()
    scorer = TargetScorer.for_decoder(decoder, catalog, scoring) if model is not None else None
    predictions = []
    try:
        with torch.no_grad() if model is not None else contextlib.nullcontext():
            for batch in batches:
                rows = predict_batch(decoder, model, batch, catalog, scorer)
                predictions.extend(rows)
                if on_batch is not None:
                    on_batch(rows)
    finally:
        if model is not None and was_training:
            model.train()
    ranks = np.asarray([p["rank"] for p in predictions], dtype=np.int64)
    return EvalResult(metrics=summarize(predictions, top_k), predictions=predictions, ranks=ranks)


def real_rows(loader, batch_idx: int, n: int) -> list[bool]:
    """Which of the ``n`` rows of batch ``batch_idx`` are real, not a distributed sampler's padding.

    ``torch.utils.data.DistributedSampler`` (which Lightning puts under validation loaders in DDP)
    pads the index list to a multiple of the world size and gives rank ``r`` positions
    ``r, r + W, ...``; local sample ``k`` is padding iff ``k * W + r >= len(dataset)``.
    """
    from torch.utils.data import DistributedSampler

    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler) or getattr(sampler, "drop_last", False):
        return [True] * n
    if loader.batch_size is None:
        raise ValueError("validation under a DistributedSampler needs a DataLoader with a fixed batch_size "
                         "(to tell padded duplicate rows from real ones)")
    size, world, rank = len(sampler.dataset), sampler.num_replicas, sampler.rank
    first = batch_idx * loader.batch_size
    return [(first + j) * world + rank < size for j in range(n)]
