"""Shared fixtures: compose the real configs (tiny backbone, debug presets) into pytest tmp dirs."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from msl_rec.utils.config import CONFIG_DIR, PROJECT_ROOT

TINY = ["backbone=tiny_llama", "trainer=cpu", "logger=none", "data.train_subset=8", "data.valid_subset=4",
        "data.micro_batch_size=2", "data.eval_batch_size=4", "optim.global_batch_size=2", "optim.warmup_steps=1"]


def compose(config_name: str, overrides: list[str], out_dir: Path):
    """The composed config as a run would see it, with paths pointing at ``out_dir``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        with open_dict(cfg):
            cfg.paths.log_dir = str(out_dir)
            cfg.paths.output_dir = str(out_dir)
            cfg.paths.work_dir = str(out_dir)
            cfg.hydra.runtime.output_dir = str(out_dir)
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            del cfg.hydra
    return cfg


@pytest.fixture
def compose_train(tmp_path):
    def make(*overrides: str, out: Path | None = None):
        return compose("train.yaml", TINY + list(overrides), out or tmp_path)

    return make


@pytest.fixture
def compose_eval(tmp_path):
    def make(*overrides: str, out: Path | None = None):
        return compose("eval.yaml", ["backbone=tiny_llama", "logger=none", *overrides], out or tmp_path)

    return make


def run_cli(module: str, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m <module> ...`` from the project root (as the console scripts do)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", WANDB_MODE="offline", WANDB_SILENT="true")
    proc = subprocess.run([sys.executable, "-m", module, *overrides], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(autouse=True)
def _reset_state():
    """Seed, default dtype and process group are reset after each test."""
    state = torch.random.get_rng_state()
    yield
    torch.random.set_rng_state(state)
    torch.set_default_dtype(torch.float32)
    random.seed(0)
    np.random.seed(0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)


@pytest.fixture
def cli():
    return run_cli
