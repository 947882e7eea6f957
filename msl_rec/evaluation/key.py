"""The eval key: what decides an evaluation's predictions (``eval_key.json`` beside them).

A resumed evaluation must have the same key as the one that wrote the predictions; merged shards the
same key but for ``rows``. ``metrics.json`` repeats the parts a reader needs (:func:`eval_record`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from msl_rec.utils.config import plain
from msl_rec.utils.files import file_sha256

KEY_IGNORED_ON_RESUME = ("ckpt_path", "encoder_run")  # the same content under another path is the same model



def eval_key(cfg: DictConfig, rows: range, predictor=None) -> dict[str, Any]:
    """What decides an evaluation's predictions of split ``rows`` (a plain, JSON-able dict).

    The model is keyed by its checkpoint's content (SHA-256), not its path: a checkpoint replaced in
    place is another model. The data by content too (split, catalog and, for popularity and the
    sampled negatives, the training file), with the prompt settings; the decoder by its settings and
    the dtype the predictor's model computes in (``predictor.compute_dtype``). The batch size is not in
    it: predictions do not depend on it. ``predictor``: a
    :class:`~msl_rec.evaluation.predict.BatchPredictor` (None: keyed by the config alone).
    """
    split_file = cfg.dataset.get(f"{cfg.split}_file")
    train_file = cfg.dataset.get("train_file")
    ckpt = cfg.get("ckpt_path")
    d = cfg.dataset
    decoder = getattr(predictor, "decoder", None)
    decoder_cfg = plain(cfg.decoder)
    decoder_cfg.pop("top_k", None)  # cut-offs change metrics, not predictions
    decoder_cfg.pop("embedding_cache", None)  # where title embeddings are kept changes nothing they hold
    if decoder is not None and hasattr(decoder, "max_new_tokens"):
        decoder_cfg["max_new_tokens"] = int(decoder.max_new_tokens)  # null resolved from the catalog
    backbone = plain(cfg.backbone)
    method = plain(cfg.get("method"))
    # a hybrid method's encoder: by content (method.encoder_sha256), and where it was read from (encoder_run)
    encoder_run = method.pop("encoder_run", None) if isinstance(method, dict) else None
    return {"split": cfg.split, "file": str(split_file), "file_sha256": file_sha256(split_file),
            "rows": [rows.start, rows.stop],
            "ckpt_sha256": file_sha256(ckpt) if ckpt else None, "ckpt_path": str(ckpt) if ckpt else None,
            "method": method, "encoder_run": encoder_run, "model": plain(cfg.get("model")),
            "backbone": {k: backbone.get(k) for k in ("name", "source", "model", "seed", "dtype", "lora", "tokenizer")},
            "prompt": {k: d.get(k) for k in ("instruction", "input_prefix", "cutoff_len")},
            "decoder": decoder_cfg, "dtype": getattr(predictor, "compute_dtype", None),
            "list_len": getattr(decoder, "num_results", getattr(decoder, "num_beams", None)),
            "item_file_sha256": file_sha256(d.item_file),
            "train_file_sha256": file_sha256(train_file) if train_file and Path(train_file).is_file() else None,
            "scoring": plain(cfg.scoring) if cfg.get("scoring") else None}


def key_differences(saved: dict, key: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """The keys in which two eval keys differ (``[]`` if they agree), as ``key: saved -> new``."""
    out = []
    for k in sorted(set(saved) | set(key)):
        if k in ignore or saved.get(k) == key.get(k):
            continue
        out.append(f"{k}: {json.dumps(saved.get(k))[:80]} -> {json.dumps(key.get(k))[:80]}")
    return out


def eval_record(key: dict[str, Any], n_users: int, num_negatives: int | None = None) -> dict[str, Any]:
    """What metrics.json says beside the metrics: how they were computed (from the eval key):
    users, split, decoder, the dtype the model computed in, the checkpoint's SHA-256 and the number of
    sampled titles ``target_rank_sampled`` ranks the target among (0: none; None: from the key)."""
    if num_negatives is None:
        scoring = key.get("scoring") or {}
        uses_model = key.get("dtype") is not None
        num_negatives = int(scoring.get("num_negatives", 0)) if uses_model and scoring.get("target_logp", True) else 0
    return {"n_users": int(n_users), "split": key.get("split"), "decoder": (key.get("decoder") or {}).get("name"),
            "dtype": key.get("dtype"), "ckpt_sha256": key.get("ckpt_sha256"), "num_negatives": int(num_negatives)}


def read_json(path: str | Path) -> Any:
    """A JSON file's content; a truncated or invalid file is an error naming it."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); it was cut off or edited: "
                         "rerun the command that wrote it (or remove the folder)") from None
