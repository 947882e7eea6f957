"""Building callbacks and loggers from config, and recording hyperparameters (rank 0 only)."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import hydra
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from msl_rec.utils.resume import WANDB_ID_FILE
from msl_rec.utils.task import is_multirun

log = logging.getLogger(__name__)


def instantiate_callbacks(cfg: DictConfig | None) -> list:
    return [hydra.utils.instantiate(c) for c in (cfg or {}).values() if isinstance(c, DictConfig) and "_target_" in c]


def _prepare_wandb(node: DictConfig, run_dir: Path) -> None:
    """Reuse the run folder's wandb id (resume) or create and store one; group sweeps together."""
    id_file = run_dir / WANDB_ID_FILE
    with open_dict(node):
        if not node.get("id"):
            if id_file.is_file():
                node.id = id_file.read_text().strip()
            else:
                node.id = uuid.uuid4().hex[:8]
        node.resume = "allow"
        if not node.get("group") and is_multirun():
            from hydra.core.hydra_config import HydraConfig

            node.group = Path(HydraConfig.get().sweep.dir).name
    if rank_zero_only.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(str(node.id))


def instantiate_loggers(cfg: DictConfig | None, run_dir: str | Path) -> list:
    loggers = []
    for node in (cfg or {}).values():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        if "wandb" in node._target_.lower():
            _prepare_wandb(node, Path(run_dir))
        loggers.append(hydra.utils.instantiate(node))
    return loggers


@rank_zero_only
def log_hyperparameters(cfg: DictConfig, trainer, module) -> None:
    """Send the composed config and parameter counts to every logger."""
    if not trainer.loggers:
        return
    hp = OmegaConf.to_container(cfg, resolve=True)
    hp.pop("hydra", None)
    model = getattr(module, "model", None)
    if model is not None:
        hp["model/params_total"] = sum(p.numel() for p in model.parameters())
        hp["model/params_trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for lg in trainer.loggers:
        lg.log_hyperparams(hp)
