"""Where the configs live, the OmegaConf resolvers and the schemas (msl_rec/utils/schema.py) they use."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from msl_rec.utils.schema import register_schemas

PROJECT_ROOT = Path(os.environ.get("MSL_REC_ROOT", Path(__file__).resolve().parents[2]))
CONFIG_DIR = str(PROJECT_ROOT / "configs")
# a run id is one folder name: letters, digits, '.', '_', '-'; no path separator, no '..', no leading '.'
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def checked_run_id(value: str, variable: str) -> str:
    """``value`` if it is a safe single folder name (:data:`RUN_ID_PATTERN`, no ``..``); else a
    ``ValueError`` naming the environment ``variable`` it came from (``MSL_REC_RUN_ID=../../x`` would
    otherwise put the run folder outside ``outputs/``)."""
    if not RUN_ID_PATTERN.fullmatch(value) or ".." in value:
        raise ValueError(f"{variable}={value!r} is not a valid run id: use one folder name of letters, digits, "
                         "'.', '_' and '-' (no '/', no '..', at most 200 characters), e.g. MSL_REC_RUN_ID=lr_1e-4_a; "
                         "to write elsewhere set hydra.run.dir=<dir>")
    return value


def run_id(env: Mapping[str, str] | None = None, now: datetime | None = None) -> str:
    """The run folder's name (``hydra.run.dir``), the same on every rank of one job.

    Processes started by an outside launcher each compose the config themselves, so a time stamp
    would differ per rank; a job id they share names the folder instead:

    - ``MSL_REC_RUN_ID`` when set (any launcher; e.g. exported in an sbatch script);
    - under ``srun`` with several tasks: ``slurm-<SLURM_JOB_ID>.<SLURM_STEP_ID>`` (SLURM's step name;
      a second ``srun`` in the same allocation gets a new folder);
    - under ``torchrun``: ``torchrun-<TORCHELASTIC_RUN_ID>`` (a fresh uuid on one node; on many nodes
      the ``--rdzv-id`` you pass, e.g. ``$SLURM_JOB_ID``);
    - otherwise (one process, or Lightning's own launcher, which pins the ranks > 0 to rank 0's
      ``hydra.run.dir``): the time with microseconds, so runs never collide.

    A multi-process job with no shared id (``torchrun`` on many nodes without ``--rdzv-id``) is an
    error: the ranks would write to different folders. An id from the environment that is not one
    safe folder name (``MSL_REC_RUN_ID=../../x``) is an error naming the variable
    (:func:`checked_run_id`).
    """
    env = os.environ if env is None else env
    if env.get("MSL_REC_RUN_ID"):
        return checked_run_id(env["MSL_REC_RUN_ID"], "MSL_REC_RUN_ID")
    slurm_tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if env.get("SLURM_JOB_ID") and env.get("SLURM_STEP_ID") is not None and slurm_tasks > 1:
        checked_run_id(env["SLURM_JOB_ID"], "SLURM_JOB_ID")
        checked_run_id(env["SLURM_STEP_ID"], "SLURM_STEP_ID")
        return f"slurm-{env['SLURM_JOB_ID']}.{env['SLURM_STEP_ID']}"
    if env.get("TORCHELASTIC_RUN_ID") not in (None, "", "none"):
        return f"torchrun-{checked_run_id(env['TORCHELASTIC_RUN_ID'], 'TORCHELASTIC_RUN_ID (torchrun --rdzv-id)')}"
    if int(env.get("WORLD_SIZE") or 1) > 1 and "RANK" in env:
        raise ValueError(
            f"rank {env['RANK']} of {env['WORLD_SIZE']} started by an outside launcher with no job id the "
            "ranks share (torchrun without --rdzv-id?): each rank would name its own run folder. "
            "Set MSL_REC_RUN_ID=<name> for all ranks, pass torchrun --rdzv-id, or set hydra.run.dir=<dir>.")
    return (now or datetime.now()).strftime("%Y-%m-%d_%H-%M-%S_%f")


def register_resolvers() -> None:
    """``${project_root:}`` -> the checkout (or ``$MSL_REC_ROOT``); ``${run_id:}`` -> :func:`run_id`
    (cached: one name per process). Safe to call twice."""
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", lambda: run_id(), use_cache=True)


register_resolvers()
register_schemas()  # what the configs' Defaults Lists name (train_schema, loss/schema_msl, ...)


def plain(node: Any, resolve: bool = True) -> Any:
    """A DictConfig/ListConfig as plain Python data (dicts, lists, scalars), interpolations resolved unless
    ``resolve=False``; anything else as is. What is saved (checkpoint hyperparameters, eval keys) is plain
    data, never an OmegaConf node."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=resolve)
    return node
