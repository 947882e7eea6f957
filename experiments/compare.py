"""LML vs MSL vs MSL+ATS: a comparison is a Hydra sweep plus a report (``make compare PRESET=cpu``)::

    python -m experiments.compare -cn compare_cpu -m stage=sweep tau=1.0,1.5,2.5
    python -m experiments.compare -cn compare_cpu -m stage=final model=lml,msl,msl_ats,popularity
    python -m experiments.compare -cn compare_cpu stage=report

Each job of a sweep is one model: it trains it (``msl-rec-train experiment=compare_<preset>``) and
evaluates it (``msl-rec-eval run_dir=``), each app in its own process, ``hydra.launcher.n_jobs`` jobs at
a time (hydra-joblib-launcher). The plan, ``experiments/configs/compare_<preset>.yaml``, says on what:

- ``stage=sweep tau=X``: MSL at tau X on the first ``sweep.train_rows`` rows (``<out>/sweep/tau_X``),
  evaluated on ``sweep.eval_shard`` of valid.csv, users the final evaluation does not see
  (``<out>/sweep_eval/tau_X``);
- ``stage=final model=<loss>``: that loss (MSL at the sweep's tau, :func:`pick_tau`, recorded in
  ``<out>/tau.json``) trained into ``<out>/train/<loss>`` and evaluated on the first ``eval.users``
  users into ``<out>/eval/<loss>``; ``model=popularity`` (or ``random``): that baseline on the same users;
- ``stage=report``: ``results.md`` and plots (``experiments/report.py``) over ``<out>/eval`` and, in
  ``tau_sweep/``, ``<out>/sweep_eval``; the LoRA adapters (``<loss>.ckpt``), ``tau.json`` and the runs'
  configs, logs and predictions (``runs/``, no checkpoints) into ``results_dir``.

Resumable: run the same commands again. A job whose evaluation finished is skipped once its runs are
found to hold the same overrides (other ones are an error naming them: use another ``out=``); an
interrupted training continues from its last checkpoint (``resume=``, with this job's overrides: the
train app refuses changed settings), an evaluation from its ``predictions.jsonl``. A failed job stops
the sweep with a non-zero exit after the others of its batch; its app's output is in
``<out>/logs/<run>.log``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
import yaml
from omegaconf import DictConfig

from experiments.report import write_report
from msl_rec.evaluation.runner import best_checkpoint
from msl_rec.utils.config import PROJECT_ROOT

MODEL_FREE = ("popularity", "random")  # decoders evaluated without a trained model
KILL_AFTER_S = 120  # an interrupted job's app gets SIGTERM (training saves at its next optimizer step,
# evaluation after its batch), then SIGKILL this long after
# the apps of this checkout (python -m, run from the project root), as the console scripts would be
TRAIN_APP, EVAL_APP = [sys.executable, "-m", "msl_rec.train"], [sys.executable, "-m", "msl_rec.eval"]


def pick_tau(scores: dict[float, dict[str, float]], metric: str, default: float) -> float:
    """The tau with the best ``metric``; ties go to the higher ``target_logp``, then to ``default``."""
    best = max(m[metric] for m in scores.values())
    top = [t for t, m in scores.items() if m[metric] == best]
    if len(top) > 1 and all("target_logp" in scores[t] for t in top):
        top = [max(top, key=lambda t: scores[t]["target_logp"])]
    return top[0] if len(top) == 1 else (default if default in top else min(top))


def sweep_tau(cfg: DictConfig) -> float:
    """MSL's tau from the finished sweep evaluations (``<out>/sweep_eval/tau_*``), written to ``tau.json``."""
    out = Path(cfg.out)
    runs = sorted(p for p in (out / "sweep_eval").glob("tau_*") if (p / "metrics.json").is_file())
    if not runs:
        raise FileNotFoundError(f"{out / 'sweep_eval'}: no finished sweep evaluation; run stage=sweep first "
                                f"(python -m experiments.compare -cn compare_{cfg.preset} -m stage=sweep tau=...)")
    scores = {float(p.name.removeprefix("tau_")): json.loads((p / "metrics.json").read_text()) for p in runs}
    tau = pick_tau(scores, cfg.sweep.metric, float(cfg.sweep.default_tau))
    record = {"tau": tau, "metric": cfg.sweep.metric, "scores": {f"{t:g}": s for t, s in scores.items()}}
    write_atomic(out / "tau.json", json.dumps(record, indent=1) + "\n")
    return tau


def plan_runs(cfg: DictConfig) -> tuple[tuple[Path, list[str]] | None, tuple[Path, list[str]]]:
    """This job's ``(training folder, msl-rec-train overrides)`` (None: a model-free baseline) and
    ``(evaluation folder, msl-rec-eval overrides)``."""
    out = Path(cfg.out)
    base = [f"experiment=compare_{cfg.preset}", *map(str, cfg.train)]
    extra = [str(o) for o in cfg.eval.overrides]
    users = [] if cfg.eval.users is None else [f"subset={cfg.eval.users}"]
    if cfg.stage == "sweep":
        if cfg.tau is None:
            raise ValueError("stage=sweep needs tau=<value> (a sweep: tau=1.0,1.5,2.5)")
        name = f"tau_{float(cfg.tau):g}"
        train = out / "sweep" / name, [*base, "loss=msl", f"loss.tau={cfg.tau}",
                                       f"data.train_subset={cfg.sweep.train_rows}"]
        return train, (out / "sweep_eval" / name, [f"run_dir={train[0]}", f"shard={cfg.sweep.eval_shard}", *extra])
    if cfg.stage != "final" or cfg.model is None:
        raise ValueError(f"stage={cfg.stage} model={cfg.model}: a job is stage=sweep tau=<x> or stage=final "
                         "model=<loss or baseline>; stage=report is a single run")
    model = str(cfg.model)
    if model in MODEL_FREE:
        return None, (out / "eval" / model, [f"decoder={model}", *users, *extra])
    tau = [f"loss.tau={sweep_tau(cfg)}"] if model == "msl" else []
    train = out / "train" / model, [*base, f"loss={model}", *tau]
    save_w = f"save_w={str(model in cfg.eval.save_w).lower()}"
    return train, (out / "eval" / model, [f"run_dir={train[0]}", *users, save_w, *extra])


def check_same_overrides(run: Path, overrides: list[str]) -> None:
    """A finished run is reused only if it was made with ``overrides`` (its ``.hydra/overrides.yaml``)."""
    path = run / ".hydra" / "overrides.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing, so {run} cannot be checked against this job's overrides; "
                                "restore it, or remove that run and its evaluation to redo them")
    saved = yaml.safe_load(path.read_text()) or []
    saved = [o for o in saved if not o.startswith("hydra.")]
    if saved != overrides:
        differ = sorted(set(saved) ^ set(overrides))
        raise ValueError(f"{run} was made with other overrides ({', '.join(differ)} differ): rerun with the ones it was "
                         f"made with, use another out=, or remove {run} to redo it")


def run_app(cmd: list[str], log: Path, threads: int) -> None:
    """Run one app process (output appended to ``log``); a non-zero exit is an error naming the log.
    An interrupted job (SIGTERM, Ctrl-C) stops its app first: SIGTERM, SIGKILL after KILL_AFTER_S."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), WANDB_MODE="offline")
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, env=env, cwd=PROJECT_ROOT, stdout=f, stderr=subprocess.STDOUT)
    try:
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=KILL_AFTER_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd[2:4])} ... failed (exit {rc}); its output: {log}")


def train_model(run: Path, overrides: list[str], log: Path, threads: int) -> None:
    """Train into ``run``: continue from its last checkpoint (``resume=`` with the same overrides, which
    the train app checks), or start afresh; an attempt that left no checkpoint is set aside first."""
    if (run / "checkpoints" / "last.ckpt").is_file():
        run_app([*TRAIN_APP, f"resume={run}", *overrides], log, threads)
        return
    if run.is_dir() and any(p.name != ".lock" for p in run.iterdir()):
        aside = run.with_name(f"{run.name}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}")
        run.rename(aside)
        print(f"moved an interrupted attempt without a checkpoint to {aside}", flush=True)
    run_app([*TRAIN_APP, *overrides, f"hydra.run.dir={run}"], log, threads)


def compare_job(cfg: DictConfig) -> None:
    """One model of the comparison: train (or resume), then evaluate (or resume); skip what is done."""
    train, (eval_dir, eval_args) = plan_runs(cfg)
    logs, threads = Path(cfg.out) / "logs", int(cfg.threads_per_job)
    if (eval_dir / "metrics.json").is_file():  # evaluated, so trained: reuse both if made the same way
        if train is not None:
            check_same_overrides(train[0], train[1])
        check_same_overrides(eval_dir, eval_args)
        print(f"done already: {eval_dir}", flush=True)
        return
    if train is not None:
        train_model(train[0], train[1], logs / f"{train[0].parent.name}-{train[0].name}.log", threads)
    run_app([*EVAL_APP, *eval_args, f"hydra.run.dir={eval_dir}"], logs / f"{eval_dir.parent.name}-{eval_dir.name}.log",
            threads)
    print(f"evaluated: {eval_dir}", flush=True)


# what the report reads of each run folder (no checkpoints): anyone can redo the report from a clone
EXPORTED = (".hydra/config.yaml", ".hydra/overrides.yaml", "metrics.json", "predictions.jsonl", "eval_key.json",
            "w_values.npz", "w_values.npy", "summary.txt")


def export_runs(root: Path, dest: Path, kinds: tuple[str, ...] = ("train", "eval", "sweep", "sweep_eval")) -> Path:
    """Copy the report's inputs of ``root/<kind>/<run>`` (configs, metrics, per-step CSV logs,
    predictions, Fig. 5 values) to ``dest/<kind>/<run>``. An evaluation's ``run_dir`` is rewritten
    relative to its copy, so ``experiments.report dest/eval`` finds the training curves there."""
    for kind in kinds:
        if not (root / kind).is_dir():
            continue
        for run in sorted(p for p in (root / kind).iterdir() if (p / ".hydra" / "config.yaml").is_file()):
            copy = dest / kind / run.name
            files = [run / f for f in EXPORTED if (run / f).is_file()] + sorted(run.rglob("metrics.csv"))
            for f in files:
                (copy / f.relative_to(run)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, copy / f.relative_to(run))
            cfg_file = copy / ".hydra" / "config.yaml"
            cfg = yaml.safe_load(cfg_file.read_text())
            if cfg.get("run_dir"):
                source = Path(cfg["run_dir"]).resolve()
                if not source.is_relative_to(root.resolve()):
                    raise ValueError(f"{run}: run_dir {source} is outside {root}; it cannot be exported with it")
                cfg["run_dir"] = os.path.relpath(dest / source.relative_to(root.resolve()), copy)
                cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


def export_adapter(ckpt: Path, dest: Path) -> Path:
    """``ckpt`` without its optimizer state (2/3 of a LoRA checkpoint): enough to re-evaluate the
    model (``msl-rec-eval ckpt_path=dest``), not to resume its training."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state.pop("optimizer_states", None)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:  # a kill leaves the old file or the new one, never half of one
        torch.save(state, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def results_dir(cfg: DictConfig) -> Path:
    """``cfg.results_dir``, or when null: the committed ``results/compare_<preset>`` for the default
    ``out``, ``<out>/results`` for another (a trial comparison never overwrites the committed one)."""
    if cfg.results_dir:
        return Path(cfg.results_dir)
    default_out = PROJECT_ROOT / "outputs" / "compare" / str(cfg.preset)
    if Path(cfg.out).resolve() == default_out.resolve():
        return PROJECT_ROOT / "results" / f"compare_{cfg.preset}"
    return Path(cfg.out) / "results"


def report(cfg: DictConfig) -> Path:
    """The report of the finished comparison under ``cfg.out``, its adapters and run copies, into
    ``cfg.results_dir``; the path of ``results.md``."""
    out, results = Path(cfg.out), results_dir(cfg)
    path = write_report([out / "eval"], results)
    print(f"report: {path}")
    if (out / "sweep_eval").is_dir():
        print(f"tau sweep: {write_report([out / 'sweep_eval'], results / 'tau_sweep')}")
    for train in sorted(p for p in (out / "train").glob("*") if (p / ".hydra" / "config.yaml").is_file()):
        ckpt = best_checkpoint(train)
        export_adapter(ckpt, results / f"{train.name}.ckpt")
        print(f"adapter: {results / f'{train.name}.ckpt'} (from {ckpt}; msl-rec-eval ckpt_path=... re-evaluates it)")
    if (out / "tau.json").is_file():
        shutil.copyfile(out / "tau.json", results / "tau.json")
    runs = export_runs(out, results / "runs")
    print(f"runs: {runs} (make report SWEEP={runs / 'eval'} redoes the report from them)")
    return path


@hydra.main(version_base="1.3", config_path="configs", config_name="compare_cpu")
def main(cfg: DictConfig) -> Any:
    # a SIGTERM (kill, a scheduler's preemption) unwinds through run_app, which stops its own app
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return report(cfg) if cfg.stage == "report" else compare_job(cfg)


if __name__ == "__main__":
    main()
