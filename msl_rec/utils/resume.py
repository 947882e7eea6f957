"""Resuming a run in its own folder: ``msl-rec-train resume=<run dir> [trainer.max_epochs=...]``.

:func:`resume_argv` runs before Hydra composes anything: it points ``hydra.run.dir`` at the old run
(so logs, checkpoints and the wandb id stay in one folder) and stores this invocation's Hydra files
under ``.hydra/resume-<time>`` so the run's original ``.hydra/config.yaml`` is kept. :func:`resume_config`
then replaces the composed config with the saved one plus this command's value overrides, and
sets ``ckpt_path`` to ``checkpoints/last.ckpt``.
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

WANDB_ID_FILE = "wandb_id.txt"
GROUPS = {"dataset", "backbone", "loss", "decoder", "trainer", "logger", "callbacks", "paths", "hydra",
          "extras", "experiment", "local", "debug"}


def _resume_dir(argv: list[str]) -> str | None:
    for arg in argv:
        if arg.startswith("resume=") and arg.split("=", 1)[1] not in ("", "null"):
            return arg.split("=", 1)[1]
    return None


def resume_argv(argv: list[str]) -> list[str]:
    """Add the Hydra overrides a resume needs (no-op without ``resume=``)."""
    run = _resume_dir(argv)
    if run is None:
        return argv
    run_dir = Path(run).expanduser().resolve()
    if not (run_dir / ".hydra" / "config.yaml").is_file():
        raise FileNotFoundError(f"resume={run}: no .hydra/config.yaml there (not a msl-rec run folder)")
    argv = [a if not a.startswith("resume=") else f"resume={run_dir}" for a in argv]
    return argv + [f"hydra.run.dir={run_dir}",
                   f"hydra.output_subdir=.hydra/resume-{time.strftime('%Y%m%d-%H%M%S')}"]


def resume_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The saved config of ``cfg.resume`` with this command's plain value overrides applied.

    Group overrides (``loss=lml``) cannot change a run that already started: they raise.
    """
    run_dir = Path(cfg.resume)
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    values = []
    for ov in overrides:
        key = ov.split("=", 1)[0].lstrip("+~")
        if key in ("resume",) or key.startswith("hydra."):
            continue
        if key in GROUPS:
            raise ValueError(f"resume: the config group override {ov!r} cannot change a resumed run")
        values.append(ov.lstrip("+"))
    cfg = OmegaConf.merge(saved, OmegaConf.from_dotlist(values)) if values else saved
    with open_dict(cfg):
        cfg.resume = str(run_dir)
        if not cfg.get("ckpt_path"):
            last = run_dir / "checkpoints" / "last.ckpt"
            if not last.is_file():
                raise FileNotFoundError(f"resume={run_dir}: {last} not found")
            cfg.ckpt_path = str(last)
    return cfg
