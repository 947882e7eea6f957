"""Optuna sweeps (``hydra/sweeper: optuna``) that keep their study: a local SQLite storage in the sweep
folder and, at the end, a plot of the optimisation history read back from it.

configs/experiment/tau_optuna.yaml sets ``hydra.sweeper.storage`` to :func:`rdb_storage` on
``<sweep dir>/optuna.db`` (the sweeper instantiates it) and adds the :class:`OptunaHistoryPlot`
callback, which writes ``<sweep dir>/optimization_history.png``. The study can be reopened later::
    optuna.load_study(study_name="msl_tau", storage=rdb_storage("sqlite:///<sweep dir>/optuna.db"))
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from msl_rec.utils.run_folder import is_launching_process

log = logging.getLogger(__name__)

HISTORY_PLOT = "optimization_history.png"
SQLITE_PREFIX = "sqlite:///"


def rdb_storage(url: str):
    """An ``optuna.storages.RDBStorage`` on ``url``; for ``sqlite:///<file>`` the file's folder is
    created and a relative file is taken from the current folder.

    hydra-optuna-sweeper 1.x needs optuna 2.x, whose storage writes its schema version (an alembic
    stamp) on a connection it never commits: SQLAlchemy 2 rolls that back and every later open fails
    (``assert version is not None``). With SQLAlchemy >= 2 and optuna 2.x the engine therefore runs in
    autocommit mode (one sweep process writes the file at a time, so nothing needs the transactions).
    """
    import optuna
    import sqlalchemy

    url = str(url)
    if url.startswith(SQLITE_PREFIX):
        path = Path(url.removeprefix(SQLITE_PREFIX)).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        url = SQLITE_PREFIX + str(path)
    engine_kwargs: dict[str, Any] = {}
    if int(sqlalchemy.__version__.split(".")[0]) >= 2 and optuna.__version__.startswith("2."):
        engine_kwargs["isolation_level"] = "AUTOCOMMIT"
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


def storage_url(storage: Any) -> str | None:
    """The URL of a ``hydra.sweeper.storage`` setting: a URL string or an :func:`rdb_storage` node."""
    if storage is None:
        return None
    if isinstance(storage, str):
        return storage
    url = OmegaConf.select(storage, "url", default=None) if isinstance(storage, DictConfig) else storage.get("url")
    return str(url) if url else None


def study_history(storage: str, study_name: str) -> tuple[list[dict[str, Any]], str]:
    """The study's trials in order, ``{"number", "state", "value", "params"}`` each, and its direction
    (``maximize``/``minimize``), read from ``storage``."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=rdb_storage(storage))
    trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": dict(t.params)}
              for t in study.trials]
    return trials, study.direction.name.lower()


def best_so_far(values: list[float | None], direction: str) -> list[float | None]:
    """The best value among the trials up to each one (``None`` until a trial has a value)."""
    better = max if direction == "maximize" else min
    out, best = [], None
    for v in values:
        if v is not None and math.isfinite(v):
            best = v if best is None else better(best, v)
        out.append(best)
    return out


def plot_history(trials: list[dict[str, Any]], direction: str, out: Path, title: str, ylabel: str) -> Path:
    """Value per completed trial (dots), the best so far (a step line) and failed trials (crosses on
    the x axis) to the PNG ``out`` (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numbers = [t["number"] for t in trials]
    values = [t["value"] if t["state"] == "COMPLETE" else None for t in trials]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    done = [(n, v) for n, v in zip(numbers, values) if v is not None]
    if done:
        ax.plot(*zip(*done), "o", label="trial value")
        best = [(n, b) for n, b in zip(numbers, best_so_far(values, direction)) if b is not None]
        ax.step(*zip(*best), where="post", label=f"best so far ({direction})")
    failed = [n for n, t in zip(numbers, trials) if t["state"] != "COMPLETE"]
    if failed:
        ax.plot(failed, [0] * len(failed), "x", color="tab:red", transform=ax.get_xaxis_transform(),
                clip_on=False, label="failed / no value")
    ax.set(xlabel="trial", ylabel=ylabel, title=title)
    if numbers:
        ax.set_xticks(numbers if len(numbers) <= 20 else ax.get_xticks())
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


class OptunaHistoryPlot(Callback):
    """Hydra callback: at the end of an Optuna multirun, read the trials back from
    ``hydra.sweeper.storage`` and write ``<sweep dir>/optimization_history.png`` (:func:`plot_history`).

    A sweep without a storage is an error (a study kept only in memory cannot be plotted or reopened).
    A failure to plot is a Hydra warning; the sweep's own results stand.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_launching_process():
            return
        sweeper = OmegaConf.select(config, "hydra.sweeper")
        url = storage_url(sweeper.get("storage"))
        if not url or not sweeper.get("study_name"):
            raise ValueError("hydra.sweeper.storage and hydra.sweeper.study_name must be set to plot the "
                             "optimisation history (see configs/experiment/tau_optuna.yaml)")
        trials, direction = study_history(url, sweeper.study_name)
        folder = Path(str(OmegaConf.select(config, "hydra.sweep.dir"))).absolute()
        metric = OmegaConf.select(config, "optimized_metric", default=None) or "objective"
        out = plot_history(trials, direction, folder / HISTORY_PLOT, f"Optuna study {sweeper.study_name}", metric)
        done = [t for t in trials if t["state"] == "COMPLETE"]
        best = (max if direction == "maximize" else min)(done, key=lambda t: t["value"]) if done else None
        log.info("optimisation history: %d trial(s), %d complete%s; %s (storage %s)", len(trials), len(done),
                 f", best {best['value']:.4f} at trial {best['number']} {best['params']}" if best else "", out, url)
