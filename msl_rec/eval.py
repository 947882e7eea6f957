"""Evaluation app: rank a split with a decoder and write predictions.jsonl + metrics.json.

    msl-rec-eval ckpt_path=outputs/train/runs/<t>/checkpoints/last.ckpt   # a checkpoint (+ this config)
    msl-rec-eval run_dir=outputs/train/runs/<t>      # that run's config and best (else last) checkpoint
    msl-rec-eval                                     # the zero-shot backbone
    msl-rec-eval decoder=popularity subset=100       # no model is loaded for popularity/random
    msl-rec-eval split=test dataset.test_file=...    # the held-back split
    msl-rec-eval shard=0/2 hydra.run.dir=outputs/ev/0   # half of the split (run 1/2 elsewhere), then
    msl-rec-eval merge=[outputs/ev/0,outputs/ev/1]   # metrics over both halves' predictions

Outputs go to the run folder (``hydra.run.dir=`` moves it); a one-line table is printed.
Predictions are appended to ``predictions.jsonl`` batch by batch: the same command with the same
``hydra.run.dir=`` resumes after the last written batch (``resume=false`` starts over).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from msl_rec.utils import config as _config  # noqa: F401  (registers ${project_root:})
from msl_rec.utils.config import CONFIG_DIR
from msl_rec.utils.task import task_wrapper

log = logging.getLogger(__name__)

# groups a run_dir's saved config provides (the eval command's own decoder/logger/paths stay)
RUN_KEYS = ("dataset", "backbone", "loss", "seed")


def best_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a training run selected by its ``monitor`` metric (not by file name).

    Read from the run's ``metrics.json`` (``best_ckpt``, written when the fit ends); for a run that
    did not finish, from the monitored ``ModelCheckpoint`` state inside ``checkpoints/last.ckpt``;
    with no validation yet, ``last.ckpt`` itself (with a warning). No checkpoint: a clear error.
    """
    ckpts = run_dir / "checkpoints"
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        best = json.loads(metrics_file.read_text()).get("best_ckpt")
        if best:
            path = run_dir / best if not Path(best).is_absolute() else Path(best)
            if not path.is_file():
                raise FileNotFoundError(f"run_dir={run_dir}: {metrics_file} names best_ckpt={best}, which does not "
                                        "exist; pass ckpt_path= explicitly")
            return path
    last = ckpts / "last.ckpt"
    if not last.is_file():
        raise FileNotFoundError(f"run_dir={run_dir}: no checkpoint (neither best_ckpt in metrics.json nor "
                                f"{last}); was the run trained? pass ckpt_path= explicitly")
    state = torch.load(last, map_location="cpu", weights_only=True).get("callbacks", {})
    for key, cb in state.items():
        if key.startswith("ModelCheckpoint") and cb.get("monitor") and cb.get("best_model_path"):
            path = Path(cb["best_model_path"])
            path = path if path.is_file() else ckpts / path.name  # the run folder may have moved
            if path.is_file():
                log.info("run_dir: best checkpoint by %s: %s", cb["monitor"], path)
                return path
    log.warning("run_dir=%s: no validated best checkpoint recorded; evaluating %s", run_dir, last)
    return last


def apply_run_dir(cfg: DictConfig) -> DictConfig:
    """Take dataset/backbone/loss from ``cfg.run_dir``'s saved config, and its best checkpoint."""
    run_dir = Path(cfg.run_dir)
    saved_file = run_dir / ".hydra" / "config.yaml"
    if not saved_file.is_file():
        raise FileNotFoundError(f"run_dir={run_dir}: no {saved_file} (not a msl-rec-train run folder); "
                                "give a folder under outputs/train/runs/ or ckpt_path=")
    saved = OmegaConf.load(saved_file)
    with open_dict(cfg):
        for key in RUN_KEYS:
            if key in saved:
                cfg[key] = saved[key]
        if not cfg.get("ckpt_path"):
            cfg.ckpt_path = str(best_checkpoint(run_dir))
    return cfg


def shard_range(n_rows: int, shard: str | None) -> range:
    """Rows of shard ``"i/n"``: the i-th (0-based) of n contiguous, near-equal slices of ``n_rows``."""
    if shard is None:
        return range(n_rows)
    try:
        i, n = (int(x) for x in str(shard).split("/"))
    except ValueError:
        raise ValueError(f"shard={shard!r}: expected 'i/n' with integers, e.g. shard=0/2") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard={shard!r}: need 0 <= i < n")
    return range(i * n_rows // n, (i + 1) * n_rows // n)


def eval_key(cfg: DictConfig, rows: range) -> dict[str, Any]:
    """What decides an evaluation's predictions; a resumed run must have the same key."""
    def sha1(path) -> str:
        return hashlib.sha1(Path(path).read_bytes()).hexdigest()

    split_file = cfg.dataset.get(f"{cfg.split}_file")
    return {"split": cfg.split, "file": str(split_file), "file_sha1": sha1(split_file), "rows": [rows.start, rows.stop],
            "ckpt_path": cfg.get("ckpt_path"), "backbone": cfg.backbone.get("name"),
            "decoder": OmegaConf.to_container(cfg.decoder, resolve=True), "item_file_sha1": sha1(cfg.dataset.item_file)}


def resume_predictions(out_dir: Path, key: dict[str, Any], resume: bool) -> list[dict]:
    """Prediction rows already written to ``out_dir`` by the same evaluation (``[]`` to start over)."""
    from msl_rec.decoding import load_predictions

    pred_file, key_file = out_dir / "predictions.jsonl", out_dir / "eval_key.json"
    done: list[dict] = []
    if resume and pred_file.is_file():
        saved = json.loads(key_file.read_text()) if key_file.is_file() else None
        if saved != key:
            raise ValueError(f"{pred_file} was written by a different evaluation ({key_file} differs or is "
                             "missing); use another hydra.run.dir= or resume=false to overwrite it")
        done = load_predictions(pred_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    key_file.write_text(json.dumps(key, indent=1) + "\n")
    with open(pred_file, "w", encoding="utf-8") as f:  # rewritten without a torn last line, if any
        f.writelines(json.dumps(p) + "\n" for p in done)
    return done


def merge_app(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``merge=[dir, ...]``: one predictions.jsonl and metrics.json over several evaluations."""
    from msl_rec.decoding import merge_predictions

    folders = [Path(f) for f in cfg.merge]
    for f in folders:
        if not (f / "predictions.jsonl").is_file():
            raise FileNotFoundError(f"merge: {f / 'predictions.jsonl'} does not exist")
    result = merge_predictions(folders, top_k=tuple(cfg.top_k))
    out_dir = Path(cfg.paths.output_dir)
    result.save(out_dir)
    line = f"merged {len(folders)} {cfg.split} n={len(result.predictions)}  " + format_table(result.metrics)
    print(line)
    (out_dir / "summary.txt").write_text(line + "\n")
    return {f"{cfg.split}/{k}": float(v) for k, v in result.metrics.items()}, {"result": result}


def format_table(metrics: dict[str, float]) -> str:
    keys = sorted(metrics, key=lambda k: (k.split("@")[0], int(k.split("@")[1]) if "@" in k else 0))
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys)


@task_wrapper
def evaluate_app(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    from msl_rec.decoding import build_decoder, evaluate
    from msl_rec.metrics import compute_metrics
    from msl_rec.models.module import RecLitModule
    from msl_rec.train import build_data

    if cfg.get("merge"):
        return merge_app(cfg)
    if cfg.get("run_dir"):
        cfg = apply_run_dir(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    split = cfg.split
    if split not in ("valid", "test"):
        raise ValueError(f"split: {split!r} (valid, test)")
    if cfg.get("subset") is not None:  # `subset=N` wins over a preset's data.<split>_subset
        with open_dict(cfg):
            cfg.data[f"{split}_subset"] = cfg.subset
    _, catalog, dm = build_data(cfg)
    dm.setup("fit" if split == "valid" else "test")
    if split == "valid":
        dm.setup("validate")
    rows = shard_range(len(dm.eval_dataloader(split).dataset), cfg.get("shard"))
    out_dir = Path(cfg.paths.output_dir)
    done = resume_predictions(out_dir, eval_key(cfg, rows), bool(cfg.get("resume", True)))
    if done:
        log.info("resuming: %d of %d users already in %s", len(done), len(rows), out_dir / "predictions.jsonl")
    decoder = build_decoder(OmegaConf.to_container(cfg.decoder, resolve=True), catalog,
                            train_targets=dm.train_targets or None)

    model, device = None, "cpu"
    if getattr(decoder, "needs_model", True):
        if cfg.get("ckpt_path"):
            from msl_rec.models.checkpoint import check_checkpoint_backbone

            check_checkpoint_backbone(cfg.ckpt_path, cfg.backbone)
            module = RecLitModule.load_from_checkpoint(cfg.ckpt_path, map_location="cpu")
            log.info("loaded %s", cfg.ckpt_path)
        else:
            module = RecLitModule(backbone=OmegaConf.to_container(cfg.backbone, resolve=True),
                                  loss=OmegaConf.to_container(cfg.loss, resolve=True))
            module.configure_model()
            log.info("zero-shot backbone %s", cfg.backbone.name)
        device = "cuda" if torch.cuda.is_available() and cfg.get("device", "auto") != "cpu" else "cpu"
        model = module.model.to(device).eval()

    def batches(row_range: range):
        for b in dm.eval_dataloader(split, row_range):
            yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}

    todo = range(rows.start + len(done), rows.stop)
    with open(out_dir / "predictions.jsonl", "a", encoding="utf-8") as f:
        def append(new_rows: list[dict]) -> None:
            f.writelines(json.dumps(p) + "\n" for p in new_rows)
            f.flush()

        result = evaluate(decoder, model, batches(todo), catalog, top_k=tuple(cfg.top_k), progress=True,
                          on_batch=append, total=-(-len(todo) // dm.eval_batch_size))
    result.predictions = done + result.predictions
    result.ranks = np.asarray([p["rank"] for p in result.predictions], dtype=np.int64)
    result.metrics = compute_metrics(result.ranks, tuple(cfg.top_k))
    (out_dir / "metrics.json").write_text(json.dumps(result.metrics, indent=2) + "\n", encoding="utf-8")
    if cfg.get("save_w") and model is not None:
        # Fig. 5: the paper's w at the positive token, per response position of the evaluated users,
        # at tau 1: w_lml = 1 - P(y) (full softmax), w_msl = 1 - P_valid(y) (softmax over the valid set)
        with torch.no_grad():
            parts = [module.valid_weights(b) for b in batches(rows)]
        w = {k: torch.cat([p[k] for p in parts]).cpu().numpy() for k in ("w_lml", "w_msl", "num_valid")}
        np.savez(out_dir / "w_values.npz", **w, tau=np.float64(1.0))
        multi = w["num_valid"] > 1
        log.info("w at tau 1 over %d response positions with > 1 valid token: LML (1 - P) mean %.4f, "
                 "MSL (1 - P_valid) mean %.4f", int(multi.sum()), float(w["w_lml"][multi].mean()),
                 float(w["w_msl"][multi].mean()))
    metrics = {f"{split}/{k}": float(v) for k, v in result.metrics.items()}

    from msl_rec.utils.logging_utils import instantiate_loggers

    for lg in instantiate_loggers(cfg.get("logger"), out_dir):
        lg.log_metrics(metrics)
        lg.finalize("success")
    line = f"{cfg.decoder.name} {split} n={len(result.predictions)}  " + format_table(result.metrics)
    print(line)
    (out_dir / "summary.txt").write_text(line + "\n")
    return metrics, {"result": result}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval.yaml")
def hydra_main(cfg: DictConfig) -> None:
    evaluate_app(cfg)


def main() -> None:
    hydra_main()


if __name__ == "__main__":
    main()
