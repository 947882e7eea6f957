"""Evaluation app: rank a split with a decoder and write predictions.jsonl + metrics.json.

    msl-rec-eval ckpt_path=outputs/train/runs/<t>/checkpoints/last.ckpt   # a checkpoint (+ this config)
    msl-rec-eval run_dir=outputs/train/runs/<t>      # that run's config and best (else last) checkpoint
    msl-rec-eval                                     # the zero-shot backbone
    msl-rec-eval decoder=popularity subset=100       # no model is loaded for popularity/random
    msl-rec-eval split=test dataset.test_file=...    # the held-back split

Outputs go to the run folder (``hydra.run.dir=`` moves it); a one-line table is printed.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from msl_rec.utils import config as _config  # noqa: F401  (registers ${project_root:})
from msl_rec.utils.config import CONFIG_DIR
from msl_rec.utils.task import task_wrapper

log = logging.getLogger(__name__)

# groups a run_dir's saved config provides (the eval command's own decoder/logger/paths stay)
RUN_KEYS = ("dataset", "backbone", "loss", "seed")


def best_checkpoint(run_dir: Path) -> Path:
    ckpts = run_dir / "checkpoints"
    best = sorted(p for p in ckpts.glob("*.ckpt") if p.name != "last.ckpt")
    if best:
        return best[-1]
    if (ckpts / "last.ckpt").is_file():
        return ckpts / "last.ckpt"
    raise FileNotFoundError(f"run_dir={run_dir}: no checkpoint under {ckpts}")


def apply_run_dir(cfg: DictConfig) -> DictConfig:
    """Take dataset/backbone/loss from ``cfg.run_dir``'s saved config, and its checkpoint."""
    run_dir = Path(cfg.run_dir)
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    with open_dict(cfg):
        for key in RUN_KEYS:
            if key in saved:
                cfg[key] = saved[key]
        if not cfg.get("ckpt_path"):
            cfg.ckpt_path = str(best_checkpoint(run_dir))
    return cfg


def format_table(metrics: dict[str, float]) -> str:
    keys = sorted(metrics, key=lambda k: (k.split("@")[0], int(k.split("@")[1]) if "@" in k else 0))
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys)


@task_wrapper
def evaluate_app(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    from msl_rec.decoding import build_decoder, evaluate
    from msl_rec.models.module import RecLitModule
    from msl_rec.train import build_data

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
    loader = dm.val_dataloader() if split == "valid" else dm.test_dataloader()
    decoder = build_decoder(OmegaConf.to_container(cfg.decoder, resolve=True), catalog,
                            train_targets=dm.train_targets or None)

    model = None
    if getattr(decoder, "needs_model", True):
        if cfg.get("ckpt_path"):
            module = RecLitModule.load_from_checkpoint(cfg.ckpt_path, map_location="cpu")
            log.info("loaded %s", cfg.ckpt_path)
        else:
            module = RecLitModule(backbone=OmegaConf.to_container(cfg.backbone, resolve=True),
                                  loss=OmegaConf.to_container(cfg.loss, resolve=True))
            module.configure_model()
            log.info("zero-shot backbone %s", cfg.backbone.name)
        device = "cuda" if torch.cuda.is_available() and cfg.get("device", "auto") != "cpu" else "cpu"
        model = module.model.to(device).eval()
        loader = ({k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in loader)

    batches = list(loader)
    with torch.no_grad():
        result = evaluate(decoder, model, batches, catalog, top_k=tuple(cfg.top_k), progress=True)
    out_dir = Path(cfg.paths.output_dir)
    result.save(out_dir)
    if cfg.get("save_w") and model is not None:
        # Fig. 5: w = 1 - P_valid(y) at every response position of the evaluated users
        import numpy as np

        w = torch.cat([module.valid_weights(b) for b in batches]).cpu().numpy()
        np.save(out_dir / "w_values.npy", w)
        log.info("w = 1 - P_valid: mean %.4f over %d response positions", float(w.mean()), len(w))
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
