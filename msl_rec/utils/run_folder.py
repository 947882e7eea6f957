"""One process per run folder, and no new training over a run that already started.

:class:`RunFolderGuard` is a Hydra callback (configs/hydra/default.yaml) that acts before Hydra
writes anything into the folder (``.hydra/``, the log); its errors are :class:`RunStopped` (exit
code 1 with the message):

- it holds an exclusive lock, ``<folder>/.lock`` (``fcntl.flock``, released by the OS however the
  process ends), for the whole run: a second run into the same ``hydra.run.dir`` (or a second sweep
  into the same ``hydra.sweep.dir``) is an error naming the folder and the holder's pid;
- a new run of a config in ``new_run_configs`` (training) into a folder that already holds a run
  (:func:`started_run_files`: checkpoints, ``metrics.json``, CSV logs, a wandb id) is an error unless it
  is a ``resume=`` of that folder: the new run would otherwise overwrite the old run's
  ``.hydra/config.yaml`` and merge the old CSV logs into its history.

Only the launching process of a job acts (:func:`is_launching_process`): the ranks > 0 of a DDP job
(started by Lightning's launcher into rank 0's folder, or by torchrun / srun) share the folder.
``flock`` locks are per host on some network filesystems (NFS without lock support); two runs on
different hosts into one shared folder are then not caught.
"""

from __future__ import annotations

import fcntl
import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

LOCK_FILE = ".lock"
# what a started training run leaves in its folder (relative glob patterns)
STARTED_RUN_MARKERS = ("checkpoints/*.ckpt", "metrics.json", "csv/version_*/metrics.csv", "wandb_id.txt")
# environment variables that hold a process's rank under Lightning's launcher, torchrun or srun
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


class RunStopped(SystemExit):
    """An error raised from a Hydra callback. Hydra's callback runner turns every ``Exception`` into a
    warning and carries on (hydra/_internal/callbacks.py), so the errors here are a ``SystemExit``
    with the message: it passes through, prints the message and exits with code 1."""

def stops_the_run(hook: Callable[..., None]) -> Callable[..., None]:
    """Make any error of a Hydra callback hook a :class:`RunStopped`: a guard that failed (an
    unwritable folder, a folder name that does not resolve) must not let the run go on unguarded."""

    @functools.wraps(hook)
    def wrapped(*args: Any, **kwargs: Any) -> None:
        try:
            hook(*args, **kwargs)
        except RunStopped:
            raise
        except Exception as exc:
            raise RunStopped(f"{type(exc).__name__}: {exc}") from exc

    return wrapped


def is_launching_process(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is rank 0 of its job (or a plain single process): no rank variable is set
    to anything but 0. Ranks > 0 (Lightning's children get ``LOCAL_RANK``, torchrun ``RANK``, srun
    ``SLURM_PROCID``) run in rank 0's folder and must not lock it or check it again."""
    env = os.environ if env is None else env
    return all(str(env.get(k) or "0").strip() == "0" for k in RANK_VARIABLES)


def started_run_files(folder: Path) -> list[Path]:
    """The files in ``folder`` that show a training run started there (:data:`STARTED_RUN_MARKERS`)."""
    return sorted(p for pattern in STARTED_RUN_MARKERS for p in Path(folder).glob(pattern))


class RunFolderLock:
    """An exclusive ``flock`` on ``<folder>/.lock``, which also holds the holder's pid and host."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunFolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        # no O_TRUNC: the holder's pid must survive another process's failed attempt to take the lock
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunStopped(
                f"run folder {self.folder} is in use by another process ({holder}; lock file {self.path}): "
                "wait for it to finish, or choose another hydra.run.dir / hydra.sweep.dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlock (the file stays: removing it would race with a process that just opened it)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def check_new_run_folder(folder: Path, what: str = "hydra.run.dir") -> None:
    """A new (not ``resume=``) training run must not start in a folder that holds a started run."""
    found = started_run_files(folder)
    if found:
        shown = ", ".join(str(p.relative_to(folder)) for p in found[:4]) + (" ..." if len(found) > 4 else "")
        raise RunStopped(
            f"{what}={folder} already holds a training run ({shown}): continue it with resume={folder}, "
            f"or start the new run in another folder (leave {what} unset for a fresh one)")


class RunFolderGuard(Callback):
    """Hydra callback: lock the run (or sweep) folder and refuse a new training run over a started one.

    ``new_run_configs``: primary config names (``train``) whose new runs must not reuse a started
    folder; other apps (``eval``, which resumes its predictions in the same folder on purpose) are
    only locked.
    """

    def __init__(self, new_run_configs: list[str] | tuple[str, ...] = ("train",)):
        self.new_run_configs = {str(c) for c in new_run_configs}
        self._lock: RunFolderLock | None = None

    def _checks_new_runs(self, config_name: str | None) -> bool:
        return Path(str(config_name or "")).stem in self.new_run_configs

    @staticmethod
    def _folder(config: DictConfig, key: str) -> Path:
        HydraConfig.instance().set_config(config)  # as run_job does next: ${hydra:...} may appear in the dir
        # the same config object Hydra resolves the folder from next, so ${run_id:} gives the same name
        return Path(str(OmegaConf.select(config, key))).absolute()

    @stops_the_run
    def on_run_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        if not is_launching_process():
            return
        folder = self._folder(config, "hydra.run.dir")
        if self._checks_new_runs(config_name) and not OmegaConf.select(config, "resume"):
            check_new_run_folder(folder, "hydra.run.dir")
        self._lock = RunFolderLock(folder).acquire()

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()

    @stops_the_run
    def on_multirun_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        if not is_launching_process():
            return
        folder = self._folder(config, "hydra.sweep.dir")
        if self._checks_new_runs(config_name):
            old = [folder / "multirun.yaml"] if (folder / "multirun.yaml").is_file() else []
            old += [p for job in sorted(folder.glob("*")) if job.is_dir() for p in started_run_files(job)]
            if old:
                raise RunStopped(
                    f"hydra.sweep.dir={folder} already holds a sweep ({old[0]}): start the new sweep in another "
                    "folder (leave hydra.sweep.dir unset for a fresh one); resume= its jobs one by one")
        self._lock = RunFolderLock(folder).acquire()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
