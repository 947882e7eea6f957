"""The task wrapper around a training/eval run, and the sweep's failure check.

Every failed job leaves ``failed.json`` in its folder (:func:`write_failure`; a later success in the
same folder, e.g. a ``resume=``, removes it). In a multirun (sweep) a failing job returns ``None`` as
the optimised metric, so the remaining jobs still run: Optuna marks the trial FAIL and samples on (a
NaN would abort the whole Optuna sweep: optuna 2.10 refuses it in ``study.tell`` and
hydra-optuna-sweeper 1.3 then fails to record the trial). :class:`SweepFailures` (a Hydra callback,
configs/hydra/default.yaml) then makes the whole multirun exit non-zero at its end, naming the failed
jobs. In a single run the exception propagates.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from msl_rec.utils.files import write_atomic
from msl_rec.utils.run_folder import RunStopped, is_launching_process, stops_the_run

log = logging.getLogger(__name__)

FAILED_FILE = "failed.json"


def is_multirun() -> bool:
    try:
        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except (ImportError, ValueError):  # no hydra, or no HydraConfig set (a plain call)
        return False


def close_loggers() -> None:
    """Finish a wandb run if one is open (rank 0 only opens one)."""
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:  # pragma: no cover
        pass


def job_folder_and_overrides(cfg: DictConfig) -> tuple[Path | None, list[str]]:
    """This job's folder (Hydra's ``runtime.output_dir``, else ``cfg.paths.output_dir``) and its task
    overrides (``[]`` outside Hydra)."""

    if HydraConfig.initialized():
        hc = HydraConfig.get()
        folder = OmegaConf.select(hc, "runtime.output_dir")
        return (Path(folder) if folder else None), [str(o) for o in hc.overrides.task]
    folder = OmegaConf.select(cfg, "paths.output_dir", default=None, throw_on_missing=False)
    return (Path(folder) if folder else None), []


def write_failure(folder: Path, exc: BaseException, overrides: list[str]) -> Path:
    """``<folder>/failed.json``: ``{"error": str(exc), "type": <class name>, "overrides": [...]}``."""
    path = folder / FAILED_FILE
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"error": str(exc), "type": type(exc).__name__, "overrides": list(overrides)},
                                  indent=1) + "\n")
    return path


def task_wrapper(task: Callable[[DictConfig], tuple[dict, dict]]):
    """Wrap ``task(cfg) -> (metrics, objects)``: loggers closed in ``finally``; a failure writes
    ``failed.json`` into the job's folder (rank 0); sweeps survive a failed job (metrics then ``{}``;
    :func:`metric_value` gives ``None``), a single run re-raises. An interruption (``SystemExit``, e.g. the
    exit after a SIGTERM, or ``KeyboardInterrupt``) is recorded too and always re-raised: it stops the
    whole sweep."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> tuple[dict, dict]:
        folder, overrides = job_folder_and_overrides(cfg)
        try:
            result = task(cfg)
        except BaseException as exc:
            if folder is not None and is_launching_process():
                try:
                    write_failure(folder, exc, overrides)
                except OSError as err:  # e.g. the folder is the problem; the original error matters more
                    log.error("could not write %s: %s", folder / FAILED_FILE, err)
            if not isinstance(exc, Exception) or not is_multirun():
                raise
            log.exception("job failed (%s written); the sweep goes on (no metric for this job) and exits non-zero at "
                          "its end", folder / FAILED_FILE if folder else FAILED_FILE)
            return {}, {}
        finally:
            close_loggers()
        if folder is not None and is_launching_process():
            (folder / FAILED_FILE).unlink(missing_ok=True)  # an earlier failure in this folder is superseded
        return result

    return wrapped


def metric_value(metrics: dict[str, Any], name: str | None) -> float | None:
    """The value a sweep optimises, as a finite float; ``None`` when the run did not produce one (a
    failed job's ``{}``, a missing or non-finite metric): Optuna then marks the trial FAIL and goes on,
    where a NaN would abort the sweep (module docstring)."""
    if not name or not metrics:
        return None
    if name not in metrics:
        log.warning("optimized_metric %r not among the run's metrics (%s)", name, sorted(metrics))
        return None
    value = metrics[name]
    value = float(value.item() if hasattr(value, "item") else value)
    if not math.isfinite(value):
        log.warning("optimized_metric %s=%s is not finite; the sweep records no value for this job", name, value)
        return None
    return value


def failure_files(sweep_dir: Path) -> dict[Path, int]:
    """``failed.json`` files of a sweep folder's jobs (any depth but ``.submitit``) -> mtime in ns."""
    out = {}
    for p in Path(sweep_dir).rglob(FAILED_FILE):
        if ".submitit" not in p.relative_to(sweep_dir).parts:
            out[p] = p.stat().st_mtime_ns
    return out


class SweepFailures(Callback):
    """Hydra callback: a multirun whose jobs wrote ``failed.json`` ends with an error naming them.

    The jobs may run elsewhere (submitit), so the sweep folder is read at the end; files that were
    there, unchanged, before the sweep started are not this sweep's. The error comes after every job
    ran (and after Optuna wrote ``optimization_results.yaml``), so the remaining jobs' results stand;
    it is a :class:`~msl_rec.utils.run_folder.RunStopped` (exit code 1 with the message), as Hydra
    turns a callback's ``Exception`` into a warning.
    """

    def __init__(self) -> None:
        self._before: dict[Path, int] = {}

    @staticmethod
    def _sweep_dir(config: DictConfig) -> Path:
        return Path(str(OmegaConf.select(config, "hydra.sweep.dir"))).absolute()

    @stops_the_run
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = self._sweep_dir(config)
        self._before = failure_files(folder) if folder.is_dir() else {}

    @stops_the_run
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = self._sweep_dir(config)
        failed = {p: t for p, t in (failure_files(folder) if folder.is_dir() else {}).items()
                  if self._before.get(p) != t}
        if not failed:
            return
        lines = []
        for path in sorted(failed):
            try:
                info = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                info = {}
            error = str(info.get("error", "?")).strip().splitlines()
            lines.append(f"  {path.parent}: {info.get('type', '?')}: {error[0] if error else ''} "
                         f"(overrides: {' '.join(info.get('overrides', []))})")
        raise RunStopped(f"{len(failed)} job(s) of the sweep in {folder} failed (each folder's {FAILED_FILE} "
                           "has the error; the other jobs' results stand):\n" + "\n".join(lines))


SUMMARY_FILE = "summary.md"


def job_objective(folder: Path, name: str | None) -> float | None:
    """A sweep job's objective, ``name`` (its ``optimized_metric``, e.g. ``val/ndcg@10``) in its
    ``metrics.json`` (where the training run writes validation keys without ``val/``); ``None`` without
    one (no name, no file, a failed or unfinished job)."""
    path = folder / "metrics.json"
    if not name or not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    value = metrics.get(name, metrics.get(name.split("/", 1)[-1]))
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _job_settings(folder: Path, sweep_config: DictConfig) -> tuple[int | None, list[str], str | None]:
    """(job number, task overrides, optimized_metric) of the job in ``folder`` from its ``.hydra`` files,
    falling back to the folder name and the sweep's own ``optimized_metric``."""
    hydra_dir = folder / ".hydra"
    overrides = OmegaConf.to_container(OmegaConf.load(hydra_dir / "overrides.yaml"))
    num = int(folder.name) if folder.name.isdigit() else None
    if (hydra_dir / "hydra.yaml").is_file():
        num = OmegaConf.select(OmegaConf.load(hydra_dir / "hydra.yaml"), "hydra.job.num", default=num)
    metric = OmegaConf.select(sweep_config, "optimized_metric", default=None, throw_on_missing=False)
    if (hydra_dir / "config.yaml").is_file():
        try:
            metric = OmegaConf.select(OmegaConf.load(hydra_dir / "config.yaml"), "optimized_metric", default=metric)
        except OmegaConfBaseException as err:  # an interpolation that does not resolve here: the sweep's own
            log.debug("%s: optimized_metric does not resolve (%s); using the sweep's", hydra_dir, err)
    return (int(num) if num is not None else None), [str(o) for o in overrides or []], metric


def sweep_jobs(sweep_dir: Path, sweep_config: DictConfig) -> list[dict[str, Any]]:
    """One dict per job folder of ``sweep_dir`` (any folder with ``.hydra/overrides.yaml`` but the
    ``.submitit`` logs), in job order: ``num``, ``folder``, ``overrides``, ``metric``, ``objective``
    (:func:`job_objective`), ``status`` (``ok``; ``ok (no objective)`` when its ``metrics.json`` lacks the
    optimised metric; ``failed: <error type>`` from its ``failed.json``) and ``error`` (the error's first
    line)."""
    jobs = []
    for path in Path(sweep_dir).glob("**/.hydra/overrides.yaml"):
        folder = path.parent.parent
        if ".submitit" in folder.relative_to(sweep_dir).parts or folder == Path(sweep_dir):
            continue
        num, overrides, metric = _job_settings(folder, sweep_config)
        status, error = "ok", ""
        if (folder / FAILED_FILE).is_file():
            try:
                info = json.loads((folder / FAILED_FILE).read_text())
            except (OSError, json.JSONDecodeError):
                info = {}
            status = f"failed: {info.get('type', '?')}"
            error = (str(info.get("error", "")).strip().splitlines() or [""])[0]
        objective = job_objective(folder, metric) if status == "ok" else None
        if status == "ok" and metric and objective is None:  # the sweep got no value from it (Optuna: FAIL)
            status = "ok (no objective)"
        jobs.append({"num": num, "folder": folder, "overrides": overrides, "metric": metric,
                     "objective": objective, "status": status, "error": error})
    return sorted(jobs, key=lambda j: (j["num"] is None, j["num"] if j["num"] is not None else 0, str(j["folder"])))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _shown_path(folder: Path) -> str:
    try:
        return str(folder.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(folder)


def sweep_summary(sweep_dir: Path, jobs: list[dict[str, Any]], mode: str | None = None) -> str:
    """The closing table of a multirun (Markdown): job, the overrides that differ between jobs (those
    every job has are listed once above it), objective, status and run folder; the best job by ``mode``
    (``max``/``min``/``maximize``/``minimize``) below it."""
    common = set.intersection(*(set(j["overrides"]) for j in jobs)) if len(jobs) > 1 else set()
    metrics = sorted({str(j["metric"]) for j in jobs if j["metric"]})
    lines = [f"# Sweep {sweep_dir}", "",
             f"{len(jobs)} job(s), {sum(j['status'].startswith('failed') for j in jobs)} failed; objective: "
             f"{', '.join(metrics) or 'none (optimized_metric is null)'}" + (f" ({mode})" if mode and metrics else "")]
    if common:
        lines.append("overrides of every job: " + " ".join(f"`{o}`" for o in sorted(common, key=jobs[0]["overrides"].index)))
    lines += ["", "| job | overrides | objective | status | run folder |", "| --- | --- | --- | --- | --- |"]
    for j in jobs:
        own = " ".join(o for o in j["overrides"] if o not in common)
        objective = f"{j['objective']:.4f}" if j["objective"] is not None else "-"
        status = j["status"] + (f" ({j['error'][:80]})" if j["error"] else "")
        lines.append(f"| {j['num'] if j['num'] is not None else '?'} | {_cell(own) or '-'} | {objective} | "
                     f"{_cell(status)} | {_cell(_shown_path(j['folder']))} |")
    scored = [j for j in jobs if j["objective"] is not None]
    if scored and mode:
        best = (max if mode.lower().startswith("max") else min)(scored, key=lambda j: j["objective"])
        own = " ".join(o for o in best["overrides"] if o not in common)
        lines += ["", f"best: job {best['num']} ({best['objective']:.4f}, {mode})" + (f": {own}" if own else "")]
    return "\n".join(lines) + "\n"


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, print a table of its jobs (:func:`sweep_summary`: job,
    overrides, objective from each job's ``metrics.json``, status from its ``failed.json``, run folder)
    and write it to ``<sweep dir>/summary.md``.

    Listed after ``sweep_failures`` in configs/hydra/default.yaml: Hydra calls ``on_multirun_end`` hooks
    in reverse order, so the table is printed before :class:`SweepFailures` ends the multirun with its
    error. A failure here is a warning (Hydra's), not a reason to hide the failed jobs.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_launching_process():
            return
        folder = SweepFailures._sweep_dir(config)
        jobs = sweep_jobs(folder, config) if folder.is_dir() else []
        if not jobs:
            return
        mode = OmegaConf.select(config, "hydra.sweeper.direction", default=None)  # Optuna's, an enum
        mode = getattr(mode, "name", mode)
        mode = mode if isinstance(mode, str) else OmegaConf.select(config, "monitor.mode", default=None)
        text = sweep_summary(folder, jobs, mode)
        print("\n" + text, flush=True)
        write_atomic(folder / SUMMARY_FILE, text)
        log.info("sweep summary: %s", folder / SUMMARY_FILE)
