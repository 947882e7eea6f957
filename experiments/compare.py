"""LML vs MSL vs MSL+ATS in one resumable command: ``python -m experiments.compare --preset cpu``.

Reads ``configs/experiment/compare_<preset>.yaml`` (its ``compare:`` block says what to run) and runs
the console apps as a user would, ``compare.jobs`` processes at a time:

1. the tau sweep: MSL at each ``compare.sweep.taus`` on the first ``train_rows`` rows, each evaluated
   on ``compare.sweep.eval_shard`` of valid.csv (users the final evaluation does not see); the tau
   with the best ``sweep.metric`` is MSL's (``tau.json``);
2. one training per loss (``experiment=compare_<preset> loss=<loss>``), same rows and seed;
3. each model evaluated on the first ``compare.eval.users`` validation users in ``eval.shards``
   shards, merged (one shard: no merge); the ``compare.baselines`` decoders on the same users;
4. the report (``experiments/report.py``) over the evaluations and over the sweep, written with the
   LoRA adapter checkpoints (``<loss>.ckpt``) into ``compare.results_dir``, and the runs' configs,
   logs and per-user predictions (``runs/``, no checkpoints) so the report can be redone from a clone.

Everything lands under ``outputs/compare/<preset>/`` (logs in ``logs/``). Run the same command again
after an interruption: finished steps are skipped (a ``.done`` file), trainings resume from their
last checkpoint and evaluations from their ``predictions.jsonl``. ``--max-minutes M`` stops (and
kills its own jobs) after M minutes, for machines that allow only short commands; exit code 3 then
means "not finished, run it again". Extra arguments are Hydra overrides for every training
(``compare.*`` ones also change the plan), e.g. ``backbone=tiny_llama compare.eval.users=8``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DONE = ".done"
KILL_AFTER_S = 10  # a stopped driver's children get SIGTERM, then SIGKILL this long after
# the apps of this checkout (python -m, run from the project root), as the console scripts would be
TRAIN_APP, EVAL_APP = [sys.executable, "-m", "msl_rec.train"], [sys.executable, "-m", "msl_rec.eval"]


@dataclass
class Step:
    """One console-app run: ``command()`` is built when its ``deps`` have finished (MSL's tau)."""

    name: str
    out: Path
    command: Callable[[], list[str]]
    deps: list[str] = field(default_factory=list)
    after: Callable[[], None] | None = None  # runs once the command succeeded, before marking done

    @property
    def done(self) -> bool:
        return (self.out / DONE).is_file()


def run_steps(steps: list[Step], jobs: int, env: dict[str, str], log_dir: Path, deadline: float | None = None,
              cwd: Path | None = None) -> bool:
    """Run ``steps`` (in list order as their deps allow), ``jobs`` at a time. True when all are done,
    False when ``deadline`` (a ``time.time()``) came first; a failed step stops everything loudly."""
    by_name = {s.name: s for s in steps}
    for s in steps:
        missing = [d for d in s.deps if d not in by_name]
        if missing:
            raise ValueError(f"step {s.name}: unknown deps {missing}")
    log_dir.mkdir(parents=True, exist_ok=True)
    pending = [s for s in steps if not s.done]
    running: dict[str, tuple[Step, subprocess.Popen, float]] = {}

    def finished(name: str) -> bool:
        return by_name[name].done

    try:
        while pending or running:
            for s in list(pending):
                if len(running) >= jobs:
                    break
                if all(finished(d) for d in s.deps):
                    pending.remove(s)
                    cmd = s.command()
                    with open(log_dir / f"{s.name}.log", "a") as log:
                        log.write("$ " + " ".join(cmd) + "\n")
                        log.flush()
                        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
                    running[s.name] = (s, proc, time.time())
                    print(f"[{time.strftime('%H:%M:%S')}] start  {s.name}: {' '.join(cmd)}", flush=True)
            for name, (s, proc, t0) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[name]
                if rc != 0:
                    raise RuntimeError(f"step {name} failed (exit {rc}); its output: {log_dir / f'{name}.log'}")
                if s.after is not None:
                    s.after()
                (s.out / DONE).write_text(f"{time.time() - t0:.0f} s\n")
                print(f"[{time.strftime('%H:%M:%S')}] done   {name} ({time.time() - t0:.0f} s)", flush=True)
            if pending and not running and not any(all(finished(d) for d in s.deps) for s in pending):
                raise RuntimeError(f"steps {[s.name for s in pending]} wait on steps that will not finish")
            if deadline is not None and time.time() > deadline and (pending or running):
                return False
            time.sleep(0.5)
        return True
    finally:
        for _, proc, _ in running.values():  # only this driver's own children
            proc.terminate()
        for _, proc, _ in running.values():
            try:  # Lightning's signal handler logs a SIGTERM and carries on predicting: kill after a grace
                proc.wait(timeout=KILL_AFTER_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def pick_tau(scores: dict[float, dict[str, float]], metric: str, default: float) -> float:
    """The tau with the best ``metric``; ties go to the higher ``target_logp``, then to ``default``."""
    best = max(m[metric] for m in scores.values())
    top = [t for t, m in scores.items() if m[metric] == best]
    if len(top) > 1 and all("target_logp" in scores[t] for t in top):
        top = [max(top, key=lambda t: scores[t]["target_logp"])]
    return top[0] if len(top) == 1 else (default if default in top else min(top))


def merge_w(shards: list[Path], out: Path) -> None:
    """Concatenate the shards' Fig. 5 values (``w_values.npz``, or the older ``w_values.npy``)."""
    npz = [s / "w_values.npz" for s in shards if (s / "w_values.npz").is_file()]
    if npz:
        parts = [np.load(p) for p in npz]
        # per-position arrays are concatenated; scalars (the tau the weights were taken at) kept once
        np.savez(out / "w_values.npz", **{k: np.concatenate([z[k] for z in parts]) if parts[0][k].ndim else parts[0][k]
                                          for k in parts[0].files})
    elif all((s / "w_values.npy").is_file() for s in shards) and shards:
        np.save(out / "w_values.npy", np.concatenate([np.load(s / "w_values.npy") for s in shards]))


# what the report reads of each run folder (no checkpoints): anyone can redo the report from a clone
EXPORTED = (".hydra/config.yaml", ".hydra/overrides.yaml", "metrics.json", "predictions.jsonl", "eval_key.json",
            "w_values.npz", "w_values.npy", "summary.txt")


def export_runs(root: Path, dest: Path, kinds: tuple[str, ...] = ("train", "eval", "sweep", "sweep_eval")) -> Path:
    """Copy the report's inputs of ``root/<kind>/<run>`` (configs, metrics, per-step CSV logs,
    predictions, Fig. 5 values) to ``dest/<kind>/<run>``. An evaluation's ``run_dir`` is rewritten
    relative to its copy, so ``experiments.report dest/eval`` finds the training curves there."""
    import yaml

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
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state.pop("optimizer_states", None)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:  # a kill leaves the old file or the new one, never half of one
        torch.save(state, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def load_plan(preset: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from msl_rec.utils.config import CONFIG_DIR

    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose("train.yaml", [f"experiment=compare_{preset}", *overrides])
    if "compare" not in cfg:
        raise ValueError(f"configs/experiment/compare_{preset}.yaml has no compare: block")
    return cfg


def build_steps(preset: str, overrides: list[str], root: Path) -> tuple[list[Step], Callable[[], None]]:
    """The steps of one comparison and the final report-and-copy action."""
    from msl_rec.utils.config import PROJECT_ROOT

    cfg = load_plan(preset, overrides)
    plan = cfg.compare
    base = [f"experiment=compare_{preset}", *overrides]
    eval_extra = [o for o in overrides if o.split("=")[0].split(".")[0].lstrip("+~") == "dataset"]
    eval_extra += [str(o) for o in plan.eval.get("overrides") or []]  # e.g. scoring.num_negatives=0
    steps: list[Step] = []

    def train_step(name: str, out: Path, extra: Callable[[], list[str]], deps: list[str] | None = None) -> Step:
        def command() -> list[str]:
            if (out / "checkpoints" / "last.ckpt").is_file():  # interrupted after an epoch: continue
                return [*TRAIN_APP, f"resume={out}"]
            return [*TRAIN_APP, *base, *extra(), f"hydra.run.dir={out}"]
        return Step(name, out, command, deps or [])

    # 1. tau sweep
    sweep_scores: dict[float, Path] = {}
    for tau in plan.sweep.taus:
        tag = f"tau_{float(tau):g}"
        tdir, edir = root / "sweep" / tag, root / "sweep_eval" / tag
        steps.append(train_step(f"sweep-{tag}", tdir, lambda t=tau: ["loss=msl", f"loss.tau={t}",
                                                                      f"data.train_subset={plan.sweep.train_rows}"]))
        steps.append(Step(f"sweep-eval-{tag}", edir, lambda t=tdir, e=edir: [
            *EVAL_APP, f"run_dir={t}", f"shard={plan.sweep.eval_shard}", *eval_extra, f"hydra.run.dir={e}"],
            [f"sweep-{tag}"]))
        sweep_scores[float(tau)] = edir
    tau_file = root / "tau.json"

    def msl_tau() -> list[str]:
        scores = {t: json.loads((d / "metrics.json").read_text()) for t, d in sweep_scores.items()}
        tau = pick_tau(scores, plan.sweep.metric, float(plan.sweep.default_tau))
        tau_file.write_text(json.dumps({"tau": tau, "metric": plan.sweep.metric,
                                        "scores": {str(t): s for t, s in scores.items()}}, indent=1) + "\n")
        print(f"MSL tau from the sweep: {tau:g} ({plan.sweep.metric}: "
              + ", ".join(f"{t:g}: {s[plan.sweep.metric]:.4f}" for t, s in scores.items()) + ")", flush=True)
        return ["loss=msl", f"loss.tau={tau}"]

    # 2. trainings, 3. evaluations
    users = [] if plan.eval.users is None else [f"subset={plan.eval.users}"]
    n = int(plan.eval.shards)
    sw = plan.eval.save_w  # true (every loss), false, or the losses whose evaluations write Fig. 5's w
    w_losses = list(plan.losses) if sw is True else [] if sw in (False, None) else [str(x) for x in sw]
    if set(w_losses) - set(plan.losses):
        raise ValueError(f"compare.eval.save_w: {sorted(set(w_losses) - set(plan.losses))} not in compare.losses")
    # all trainings first (in list order), then the evaluations: a training never waits behind them
    for loss in plan.losses:
        tdir = root / "train" / loss
        if loss == "msl":
            steps.append(train_step("train-msl", tdir, msl_tau, [f"sweep-eval-{t}" for t in
                                                                  (f"tau_{float(x):g}" for x in plan.sweep.taus)]))
        else:
            steps.append(train_step(f"train-{loss}", tdir, lambda loss=loss: [f"loss={loss}"]))
    for loss in plan.losses:
        tdir = root / "train" / loss
        save_w = f"save_w={str(loss in w_losses).lower()}"
        edir = root / "eval" / loss
        if n == 1:  # one evaluation, straight into eval/<loss>
            steps.append(Step(f"eval-{loss}", edir, lambda t=tdir, e=edir, w=save_w: [
                *EVAL_APP, f"run_dir={t}", *users, w, *eval_extra, f"hydra.run.dir={e}"], [f"train-{loss}"]))
            continue
        shards = [root / "shards" / f"{loss}-{i}" for i in range(n)]
        for i, sdir in enumerate(shards):
            steps.append(Step(f"eval-{loss}-{i}", sdir, lambda t=tdir, s=sdir, i=i, w=save_w: [
                *EVAL_APP, f"run_dir={t}", *users, f"shard={i}/{n}", w, *eval_extra, f"hydra.run.dir={s}"],
                [f"train-{loss}"]))
        steps.append(Step(f"merge-{loss}", edir, lambda t=tdir, e=edir, sh=shards: [
            *EVAL_APP, "merge=[" + ",".join(str(s) for s in sh) + "]", f"run_dir={t}", f"hydra.run.dir={e}"],
            [f"eval-{loss}-{i}" for i in range(n)], after=lambda sh=shards, e=edir: merge_w(sh, e)))
    for dec in plan.baselines:
        edir = root / "eval" / dec
        steps.append(Step(f"eval-{dec}", edir, lambda d=dec, e=edir: [
            *EVAL_APP, f"decoder={d}", *users, *eval_extra, f"hydra.run.dir={e}"]))

    # 4. report and adapters
    def finish() -> None:
        from experiments.report import write_report
        from msl_rec.eval import best_checkpoint

        results = Path(plan.results_dir)
        results = results if results.is_absolute() else PROJECT_ROOT / results
        print(f"report: {write_report([root / 'eval'], results)}")
        print(f"tau sweep: {write_report([root / 'sweep_eval'], results / 'tau_sweep')}")
        for loss in plan.losses:
            ckpt = best_checkpoint(root / "train" / loss)
            export_adapter(ckpt, results / f"{loss}.ckpt")
            print(f"adapter: {results / f'{loss}.ckpt'} (from {ckpt}; msl-rec-eval ckpt_path=... re-evaluates it)")
        if tau_file.is_file():
            shutil.copyfile(tau_file, results / "tau.json")
        runs = export_runs(root, results / "runs")
        print(f"runs: {runs} (make report SWEEP={runs / 'eval'} redoes the report from them)")

    return steps, finish


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", required=True, help="cpu or gpu: configs/experiment/compare_<preset>.yaml")
    ap.add_argument("--out", type=Path, default=None, help="default: outputs/compare/<preset>")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop after this long (exit 3: run again)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every training, e.g. compare.jobs=1")
    args = ap.parse_args(argv)
    from msl_rec.utils.config import PROJECT_ROOT

    # a SIGTERM (kill, a scheduler's preemption) unwinds through run_steps, which stops its own jobs
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    t0 = time.time()
    root = (args.out or PROJECT_ROOT / "outputs" / "compare" / args.preset).resolve()
    steps, finish = build_steps(args.preset, args.overrides, root)
    plan = load_plan(args.preset, args.overrides).compare
    threads = str(int(plan.threads_per_job))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, WANDB_MODE="offline")
    deadline = None if args.max_minutes is None else t0 + 60 * args.max_minutes
    if not run_steps(steps, int(plan.jobs), env, root / "logs", deadline, cwd=PROJECT_ROOT):
        print(f"stopped after {args.max_minutes} min; run the same command again to continue", flush=True)
        return 3
    finish()
    print(f"done in {time.time() - t0:.0f} s: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
