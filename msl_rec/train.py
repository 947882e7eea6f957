"""Training app: ``msl-rec-train [group=option ...] [key=value ...]`` (Hydra; see configs/train.yaml).

Examples::

    msl-rec-train                                   # SmolLM2-135M, MSL+ATS, Books, wandb offline
    msl-rec-train loss=lml logger=csv debug=limit
    msl-rec-train -m loss=lml,msl                   # a sweep; folders under outputs/train/multiruns
    msl-rec-train resume=outputs/train/runs/<time>  # continue that run in its folder (last.ckpt)
    msl-rec-train trainer=ddp trainer.devices=4     # one node, 4 GPUs

SLURM: Lightning detects SLURM (``SLURMEnvironment``) and takes ranks from it; launch one task per
GPU, e.g. in an sbatch script with ``#SBATCH --nodes=2 --ntasks-per-node=8 --gpus-per-node=8``::

    srun python -m msl_rec.train trainer=ddp trainer.num_nodes=2 trainer.devices=8

Gradient accumulation is derived: ``optim.global_batch_size / (data.micro_batch_size * world size)``,
which must be a whole number.

Failure behaviour (README "Failure behaviour"): a checkpoint that cannot be written, a non-finite loss
or weight, and a reported checkpoint that is missing at the end all stop the run with an error; so do
``trainer.max_epochs=0`` / ``trainer.max_steps=0`` (no model), a ``resume=`` that changes what is
trained (msl_rec/utils/resume.py) and a second run into a locked or already used run folder
(msl_rec/utils/run_folder.py). SIGTERM writes ``checkpoints/last.ckpt`` at the current optimizer step
and exits 143 (msl_rec/utils/signals.py); ``resume=`` continues there. A sweep runs every job and exits
non-zero at its end if any failed (``failed.json`` in the job's folder; msl_rec/utils/task.py).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from msl_rec.data.build import build_data, is_sequential
from msl_rec.decoding import decoder_settings
from msl_rec.models.checkpoint import read_checkpoint
from msl_rec.training.methods import build_module, check_method
from msl_rec.training.optim import optim_settings
from msl_rec.utils.callbacks import BestMetricsWriter, VerifiedCheckpointIO
from msl_rec.utils.config import CONFIG_DIR, plain  # importing it registers ${project_root:} and the schemas
from msl_rec.utils.logging_utils import (
    instantiate_callbacks,
    instantiate_loggers,
    log_hyperparameters,
    run_identity,
)
from msl_rec.utils.precision import auto_dtype
from msl_rec.utils.registry import check_targets
from msl_rec.utils.resume import resume_argv, resume_config
from msl_rec.utils.run_folder import is_launching_process
from msl_rec.utils.signals import SIGTERM_EXIT_CODE, StopTrainingOnSigterm
from msl_rec.utils.task import metric_value, task_wrapper

log = logging.getLogger(__name__)


def world_size(trainer_cfg: DictConfig) -> int:
    """Processes a Trainer built from ``trainer_cfg`` will run (devices x nodes)."""
    devices = trainer_cfg.get("devices", 1)
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        n = len(devices)
    elif str(devices) in ("auto", "-1"):
        n = torch.cuda.device_count() if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else 1
    else:
        n = int(devices)
    return max(1, n) * int(trainer_cfg.get("num_nodes", 1) or 1)


def check_training_length(cfg: DictConfig) -> None:
    """A run that would train nothing (``trainer.max_epochs=0``, ``trainer.max_steps=0``,
    ``trainer.limit_train_batches=0``) is an error naming the key: it would exit 0 with no model.
    (-1 means unlimited for both max keys, as in Lightning.)"""
    for key in ("trainer.max_epochs", "trainer.max_steps", "trainer.limit_train_batches"):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
            raise ValueError(f"{key}={value}: the run would train nothing and save no model; set it to a positive "
                             "number (or -1: unlimited, for max_epochs / max_steps)")


def grad_accumulation(cfg: DictConfig, world: int) -> int:
    """Micro-batches per optimizer step so that micro batch x world size x it = ``optim.global_batch_size``.
    Both are whole numbers by the schema; that they divide is checked here."""
    gbs, mbs = int(cfg.optim.global_batch_size), int(cfg.data.micro_batch_size)
    if mbs < 1:
        raise ValueError(f"data.micro_batch_size={mbs}: must be >= 1")
    per_pass = mbs * world
    if gbs < per_pass or gbs % per_pass:
        valid = ", ".join(str(per_pass * k) for k in range(1, 5))
        divisors = [d for d in range(1, gbs + 1) if gbs % (d * world) == 0] if gbs >= world else []
        raise ValueError(
            f"optim.global_batch_size={gbs} is not a multiple of data.micro_batch_size ({mbs}) x world size "
            f"({world}) = {per_pass}: set optim.global_batch_size to one of {valid}, ... or data.micro_batch_size "
            f"to one of {divisors or 'none (fewer devices needed)'}")
    return gbs // per_pass


def trainer_precision(trainer_cfg: DictConfig) -> str:
    """The trainer config's ``precision``, or if it is null: bf16-mixed where the device computes bf16
    natively (a GPU; a CPU with AVX512-BF16/AMX, see :func:`~msl_rec.utils.precision.cpu_supports_bf16`),
    else 32-true. LoRA weights and optimiser state stay fp32 under bf16-mixed (autocast), and the
    losses upcast their logits to fp32."""
    if trainer_cfg.get("precision"):
        return str(trainer_cfg.precision)
    on_gpu = torch.cuda.is_available() and str(trainer_cfg.get("accelerator", "auto")) in ("auto", "gpu", "cuda")
    return "bf16-mixed" if auto_dtype("cuda" if on_gpu else "cpu") == torch.bfloat16 else "32-true"


def build_strategy(strategy: Any, find_unused: bool = False) -> Any:
    """A strategy name as is; a ``_target_`` dict (trainer=fsdp, ddp_sim, ...) instantiated, with an FSDP
    ``auto_wrap_policy`` given as class paths (LlamaDecoderLayer) turned into a set of classes.
    ``find_unused``: some steps leave trainable parameters out of the loss (LLaRA's text-only curriculum steps
    do not use the projector), so DDP must look for them (else it stops: "parameters that were not used")."""
    if find_unused and strategy == "ddp":
        return "ddp_find_unused_parameters_true"
    if not isinstance(strategy, dict) or "_target_" not in strategy:
        return strategy
    strategy = dict(strategy)
    if find_unused and str(strategy["_target_"]).endswith("DDPStrategy"):
        strategy.setdefault("find_unused_parameters", True)
    if isinstance(strategy.get("auto_wrap_policy"), list):
        strategy["auto_wrap_policy"] = {hydra.utils.get_class(c) for c in strategy["auto_wrap_policy"]}
    return hydra.utils.instantiate(strategy, _convert_="partial")


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit (and validate every epoch); return (metrics, objects).

    ``cfg`` is typed (msl_rec/utils/schema.py ``TrainConfig``): keys and types were checked when it was
    composed; the values a type cannot express are checked here before anything is loaded."""
    # every class the config names (a resumed run's is a loaded file) comes from the allowlist
    check_targets(cfg, source=f"{cfg.resume}/.hydra/config.yaml" if cfg.get("resume") else "the training config")
    check_method(cfg)  # a loss, model or decoder of the other kind of method: an error naming both
    if cfg.get("decoder"):  # top_k and the decoder settings fail now, not at the first validation
        decoder_settings(cfg.decoder, cfg.top_k)
    optim_settings(plain(cfg.optim))  # a bad lr / weight decay: an error before any loading
    check_training_length(cfg)
    ws = world_size(cfg.trainer)
    accumulate = grad_accumulation(cfg, ws)  # before any loading: a bad batch setting fails at once
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)

    sft_ckpt = OmegaConf.select(cfg, "sdpo.sft_ckpt")
    # S-DPO's negatives are built by the data module, so the loss's count is known before the data
    num_negatives = 0 if is_sequential(cfg) else int(cfg.loss.get("num_negatives") or 0)
    _, catalog, dm = build_data(cfg, num_negatives=num_negatives)
    module = build_module(cfg, catalog, sft_ckpt=sft_ckpt)
    if getattr(module.loss, "needs_reference", False) and not sft_ckpt:
        log.warning("%s without sdpo.sft_ckpt: the reference is the bare base model, not an SFT model "
                    "(the paper starts S-DPO from an LML checkpoint)", cfg.loss._target_)

    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    # not optional: a SIGTERM saves checkpoints/last.ckpt at the current step and exits 143
    callbacks.append(StopTrainingOnSigterm(Path(cfg.paths.output_dir) / "checkpoints"))
    # a wandb run named after what varies (dataset/backbone/loss/overrides), not "train"
    loggers = instantiate_loggers(cfg.get("logger"), cfg.paths.output_dir, identity=run_identity(cfg))
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["precision"] = trainer_precision(cfg.trainer)
    trainer_cfg["accumulate_grad_batches"] = accumulate
    # Lightning's writer swallows PermissionError; this one raises when a checkpoint was not written
    trainer_cfg["plugins"] = [*(trainer_cfg.get("plugins") or []), VerifiedCheckpointIO()]
    log.info("world size %d, micro batch %d, accumulate %d -> global batch %d", ws, cfg.data.micro_batch_size,
             accumulate, accumulate * ws * cfg.data.micro_batch_size)
    if "strategy" in trainer_cfg:
        curriculum = bool(OmegaConf.select(cfg, "method.curriculum.enabled", default=False))
        trainer_cfg["strategy"] = build_strategy(trainer_cfg["strategy"], find_unused=curriculum)
    trainer: L.Trainer = hydra.utils.instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False,
                                                 _convert_="partial")
    objects = {"cfg": cfg, "datamodule": dm, "model": module, "trainer": trainer}
    log_hyperparameters(cfg, trainer, module)

    if cfg.get("ckpt_path"):
        read_checkpoint(cfg.ckpt_path)  # a bad or unsafe file: an error naming it, before training starts
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    except SIGTERMException as stop:  # Lightning raises it with no exit code, which would exit 0
        if stop.code in (None, 0):
            raise SIGTERMException(SIGTERM_EXIT_CODE) from stop
        raise
    metrics = {k: (v.item() if hasattr(v, "item") else v) for k, v in trainer.callback_metrics.items()}
    # the sweep objective is the selected (best) epoch's, not the last epoch's
    for cb in trainer.callbacks:
        if isinstance(cb, BestMetricsWriter):
            metrics.update({k: v for k, v in cb.best_metrics.items() if k not in ("epoch", "step")})
    check_checkpoints(trainer)
    return metrics, objects


def check_checkpoints(trainer: L.Trainer) -> None:
    """Every best/last checkpoint the run reports must exist (rank 0, shared run folder)."""
    if not trainer.is_global_zero:
        return
    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint):
            continue
        for kind, path in (("best", cb.best_model_path), ("last", cb.last_model_path)):
            if path and "://" not in path and not Path(path).is_file():
                raise FileNotFoundError(f"the run reports the {kind} checkpoint {path}, which does not exist")
        if cb.monitor and cb.best_model_path:
            log.info("best checkpoint (%s): %s", cb.monitor, cb.best_model_path)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train.yaml")
def hydra_main(cfg: DictConfig) -> float | None:
    if cfg.get("resume"):
        hc = HydraConfig.get()
        # every config group of this composition (budget, experiment, ...), not a hand-kept list
        cfg = resume_config(cfg, list(hc.overrides.task), groups=dict(hc.runtime.choices),
                            record=is_launching_process())
    if cfg.get("extras", {}).get("print_config"):
        log.info("config:\n%s", OmegaConf.to_yaml(cfg, resolve=False))
    metrics, _ = train(cfg)
    return metric_value(metrics, cfg.get("optimized_metric"))


def main() -> None:
    """Console script: adds the Hydra overrides a ``resume=`` needs, then runs the Hydra app."""
    sys.argv = [sys.argv[0]] + resume_argv(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
