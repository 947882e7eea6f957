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

Gradient accumulation is derived: ``optim.global_batch_size // (data.micro_batch_size * world size)``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from msl_rec.utils import config as _config  # noqa: F401  (registers ${project_root:})
from msl_rec.utils.config import CONFIG_DIR
from msl_rec.utils.logging_utils import instantiate_callbacks, instantiate_loggers, log_hyperparameters
from msl_rec.utils.resume import resume_argv, resume_config
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


def trainer_precision(trainer_cfg: DictConfig) -> str:
    """The trainer config's ``precision``, or if it is null: bf16-mixed where the device computes bf16
    natively (a GPU; a CPU with AVX512-BF16/AMX, see :func:`~msl_rec.utils.precision.cpu_supports_bf16`),
    else 32-true. LoRA weights and optimiser state stay fp32 under bf16-mixed (autocast), and the
    losses upcast their logits to fp32."""
    from msl_rec.utils.precision import auto_dtype

    if trainer_cfg.get("precision"):
        return str(trainer_cfg.precision)
    on_gpu = torch.cuda.is_available() and str(trainer_cfg.get("accelerator", "auto")) in ("auto", "gpu", "cuda")
    return "bf16-mixed" if auto_dtype("cuda" if on_gpu else "cpu") == torch.bfloat16 else "32-true"


def build_data(cfg: DictConfig, num_negatives: int = 0):
    """Tokenizer, item catalog and data module for ``cfg.dataset`` and ``cfg.backbone``."""
    from msl_rec.data.catalog import ItemCatalog
    from msl_rec.data.datamodule import RecDataModule
    from msl_rec.models.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(cfg.backbone.tokenizer)
    catalog = ItemCatalog.from_file(cfg.dataset.item_file, tokenizer,
                                    allow_empty_titles=bool(cfg.dataset.get("allow_empty_titles", False)))
    d = cfg.data
    dm = RecDataModule(cfg.dataset, tokenizer, catalog, micro_batch_size=int(d.micro_batch_size),
                       eval_batch_size=int(d.eval_batch_size), train_subset=d.get("train_subset"),
                       valid_subset=d.get("valid_subset"), test_subset=d.get("test_subset"),
                       num_negatives=num_negatives, fixed_negatives=bool(d.get("fixed_negatives", False)),
                       seed=int(cfg.seed), num_workers=int(d.get("num_workers", 0)))
    return tokenizer, catalog, dm


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit (and validate every epoch); return (metrics, objects)."""
    from msl_rec.models.module import RecLitModule

    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)

    module = RecLitModule(backbone=_plain(cfg.backbone), loss=_plain(cfg.loss), optim=_plain(cfg.optim),
                          decoder=_plain(cfg.get("decoder")), top_k=list(cfg.get("top_k", [1, 5, 10])))
    _, _, dm = build_data(cfg, num_negatives=int(getattr(module.loss, "num_negatives", 0)))

    ws = world_size(cfg.trainer)
    accumulate = max(1, int(cfg.optim.global_batch_size) // (int(cfg.data.micro_batch_size) * ws))
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"), cfg.paths.output_dir)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["precision"] = trainer_precision(cfg.trainer)
    trainer_cfg["accumulate_grad_batches"] = accumulate
    log.info("world size %d, micro batch %d, accumulate %d -> global batch %d", ws, cfg.data.micro_batch_size,
             accumulate, accumulate * ws * cfg.data.micro_batch_size)
    strategy = trainer_cfg.get("strategy")
    if isinstance(strategy, dict) and isinstance(strategy.get("auto_wrap_policy"), list):
        # FSDP: wrap policy given as class paths (LlamaDecoderLayer) -> a set of classes
        strategy["auto_wrap_policy"] = {hydra.utils.get_class(c) for c in strategy["auto_wrap_policy"]}
        trainer_cfg["strategy"] = hydra.utils.instantiate(strategy, _convert_="partial")
    trainer: L.Trainer = hydra.utils.instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False,
                                                 _convert_="partial")
    objects = {"cfg": cfg, "datamodule": dm, "model": module, "trainer": trainer}
    log_hyperparameters(cfg, trainer, module)

    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: (v.item() if hasattr(v, "item") else v) for k, v in trainer.callback_metrics.items()}
    ckpt_cb = getattr(trainer, "checkpoint_callback", None)
    if ckpt_cb is not None and getattr(ckpt_cb, "best_model_path", ""):
        log.info("best checkpoint: %s", ckpt_cb.best_model_path)
    return metrics, objects


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train.yaml")
def hydra_main(cfg: DictConfig) -> float | None:
    if cfg.get("resume"):
        from hydra.core.hydra_config import HydraConfig

        cfg = resume_config(cfg, list(HydraConfig.get().overrides.task))
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
