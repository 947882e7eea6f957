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

Everything lands under ``outputs/compare/<preset>/`` (logs in ``logs/``), or under ``--out X``; with
``--out`` the report, adapters and run copies go to ``X/results`` instead of ``compare.results_dir``
(unless ``compare.results_dir=...`` is given), so nothing under ``experiments/results`` is touched.
Run the same command again after an interruption: finished steps are skipped (a ``.done`` file),
trainings resume from their last checkpoint and evaluations from their ``predictions.jsonl``. Each
step records the settings it runs with (its app's composed config, and what its dependencies ran
with) in ``step_settings.json``; a rerun with other overrides or preset values refuses to reuse or
resume such a step and names the keys that differ (use another ``--out``, or remove that step's
folder and those of the steps after it). ``--max-minutes M`` stops (and kills its own jobs) after M
minutes, for machines that allow only short commands; exit code 3 then means "not finished, run it
again". Extra arguments are Hydra overrides for every training
(``compare.*`` ones also change the plan), e.g. ``backbone=tiny_llama compare.eval.users=8``.
"""

from __future__ import annotations

import argparse
import hashlib
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
from typing import Any

import numpy as np

DONE = ".done"
SETTINGS = "step_settings.json"  # what a step's output was made with: a resume with other settings refuses
KILL_AFTER_S = 120  # a stopped driver's children get SIGTERM (training saves at its next optimizer step,
# evaluation after its batch), then SIGKILL this long after
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
    # the settings its output depends on, ``{dotted key: value}`` (recorded in ``out``); None: not checked
    settings: Callable[[], dict[str, Any]] | None = None

    @property
    def done(self) -> bool:
        return (self.out / DONE).is_file()


def run_steps(steps: list[Step], jobs: int, env: dict[str, str], log_dir: Path, deadline: float | None = None,
              cwd: Path | None = None) -> bool:
    """Run ``steps`` (in list order as their deps allow), ``jobs`` at a time. True when all are done,
    False when ``deadline`` (a ``time.time()``) came first; a failed step stops everything loudly."""
    by_name = {s.name: s for s in steps}

    def finished(name: str) -> bool:
        return by_name[name].done

    for s in steps:
        missing = [d for d in s.deps if d not in by_name]
        if missing:
            raise ValueError(f"step {s.name}: unknown deps {missing}")
    log_dir.mkdir(parents=True, exist_ok=True)
    check = SettingsCheck(by_name)
    unchecked = [s for s in steps if s.done]

    def check_done() -> None:
        """A finished step made with other settings (its own, or a dependency's: compared once the
        dependency is done, e.g. redone after its folder was removed) is not reused."""
        for s in list(unchecked):
            if all(finished(d) for d in s.deps):
                unchecked.remove(s)
                check(s, record=False)

    check_done()  # before anything runs
    pending = [s for s in steps if not s.done]
    running: dict[str, tuple[Step, subprocess.Popen, float]] = {}

    try:
        while pending or running:
            check_done()
            for s in list(pending):
                if len(running) >= jobs:
                    break
                if all(finished(d) for d in s.deps):
                    pending.remove(s)
                    check(s, record=True)  # a step resumed from a partial output: the same settings
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
        check_done()  # the finished steps whose dependencies finished last
        return True
    finally:
        for _, proc, _ in running.values():  # only this driver's own children
            proc.terminate()
        for _, proc, _ in running.values():
            try:  # SIGTERM: training saves at the next optimizer step, evaluation after its batch; then kill
                proc.wait(timeout=KILL_AFTER_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class SettingsCheck:
    """Compare a step's settings with those recorded in its folder (``step_settings.json``).

    A step's settings are its own (``Step.settings``) and, under ``after <dep>``, a digest of each
    dependency's: a training redone with other settings makes its evaluations' outputs stale too.
    Each step's settings are computed once per driver run.
    """

    def __init__(self, by_name: dict[str, Step]):
        self.by_name = by_name
        self.cache: dict[str, dict[str, Any] | None] = {}

    def settings(self, step: Step) -> dict[str, Any] | None:
        if step.name not in self.cache:
            own = None if step.settings is None else dict(step.settings())
            if own is not None:
                for d in step.deps:
                    dep = self.settings(self.by_name[d])
                    if dep is not None:
                        text = json.dumps(dep, sort_keys=True, default=str)
                        own[f"after {d}"] = hashlib.sha1(text.encode()).hexdigest()
            self.cache[step.name] = own
        return self.cache[step.name]

    def __call__(self, step: Step, record: bool) -> None:
        """Raise if ``step.out`` holds a record of other settings; write the record (``record``) when none."""
        path = step.out / SETTINGS
        if not path.is_file() and not record:  # made before settings were recorded: nothing to compare
            return
        now = self.settings(step)
        if now is None:
            return
        if not path.is_file():
            step.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(now, indent=1, sort_keys=True, default=str) + "\n")
            return
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"step {step.name}: {path} is not valid JSON (interrupted while writing?); "
                             f"remove {step.out} to redo that step") from None
        now = json.loads(json.dumps(now, default=str))  # as recorded: tuples become lists
        unset = "(unset)"
        differ = sorted(k for k in saved.keys() | now.keys() if saved.get(k, unset) != now.get(k, unset))
        if differ:
            shown = "; ".join(f"{k}: {saved.get(k, unset)!r} then, {now.get(k, unset)!r} now"
                              for k in differ[:8])
            more = f" and {len(differ) - 8} more" if len(differ) > 8 else ""
            raise ValueError(f"step {step.name}: {step.out} was made with other settings ({shown}{more}); "
                             "rerun with the overrides and preset it was made with, use another --out, or "
                             "remove that folder and those of the steps after it to redo them")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def composed_settings(config_name: str, args: list[str], root: Path) -> dict[str, Any]:
    """What an app run with ``args`` uses: ``configs/<config_name>`` composed with them, flattened to
    dotted keys. ``compare.*`` (the driver's plan: what it changes shows in the args) and ``hydra.*``
    are left out; paths under ``root`` are written relative to it, so a moved ``--out`` still matches."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from msl_rec.utils.config import CONFIG_DIR

    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose(config_name, [a for a in args if not a.lstrip("+~").startswith("hydra.")])
    flat = flatten(OmegaConf.to_container(cfg, resolve=False))

    def relative(v: Any) -> Any:
        if isinstance(v, list):
            return [relative(x) for x in v]
        return v.replace(str(root), "<out>") if isinstance(v, str) else v

    return {k: relative(v) for k, v in flat.items() if not k.startswith("compare.")}


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


def results_dir(plan, overrides: list[str], out: Path | None) -> Path:
    """Where the report, adapters, ``tau.json`` and run copies go: ``compare.results_dir`` when given
    on the command line; else ``<out>/results`` with ``--out`` (nothing under the project's
    ``experiments/results`` is touched); else the preset's ``compare.results_dir`` (relative: to the
    project root)."""
    from msl_rec.utils.config import PROJECT_ROOT

    explicit = any(o.split("=")[0].lstrip("+~") == "compare.results_dir" for o in overrides)
    if out is not None and not explicit:
        return out / "results"
    path = Path(plan.results_dir)
    return path if path.is_absolute() else PROJECT_ROOT / path


def set_aside_attempt(out: Path) -> None:
    """Move an interrupted attempt that left no checkpoint (only logs, a config) to
    ``<out>.interrupted-<time>``, keeping the step's recorded settings, so the step starts afresh."""
    keep = {SETTINGS, ".lock"}
    if not out.is_dir() or not [p for p in out.iterdir() if p.name not in keep]:
        return
    aside = out.with_name(f"{out.name}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}")
    out.rename(aside)
    out.mkdir()
    if (aside / SETTINGS).is_file():
        (aside / SETTINGS).rename(out / SETTINGS)
    print(f"[{time.strftime('%H:%M:%S')}] moved the interrupted attempt without a checkpoint to {aside}", flush=True)


def build_steps(preset: str, overrides: list[str], root: Path,
                results: Path | None = None) -> tuple[list[Step], Callable[[], None]]:
    """The steps of one comparison and the final report-and-copy action (into ``results``; None:
    :func:`results_dir` without ``--out``)."""
    cfg = load_plan(preset, overrides)
    plan = cfg.compare
    results_out = results
    base = [f"experiment=compare_{preset}", *overrides]
    eval_extra = [o for o in overrides if o.split("=")[0].split(".")[0].lstrip("+~") == "dataset"]
    eval_extra += [str(o) for o in plan.eval.get("overrides") or []]  # e.g. scoring.num_negatives=0
    steps: list[Step] = []

    def train_step(name: str, out: Path, extra: Callable[[], list[str]], deps: list[str] | None = None) -> Step:
        def command() -> list[str]:
            if (out / "checkpoints" / "last.ckpt").is_file():  # interrupted after a checkpoint: continue
                return [*TRAIN_APP, f"resume={out}"]
            set_aside_attempt(out)  # a new run is refused in a used folder
            return [*TRAIN_APP, *base, *extra(), f"hydra.run.dir={out}"]
        return Step(name, out, command, deps or [],
                    settings=lambda: composed_settings("train.yaml", [*base, *extra()], root))

    def eval_step(name: str, out: Path, args: Callable[[], list[str]], deps: list[str] | None = None,
                  after: Callable[[], None] | None = None) -> Step:
        return Step(name, out, lambda: [*EVAL_APP, *args(), f"hydra.run.dir={out}"], deps or [], after,
                    settings=lambda: composed_settings("eval.yaml", args(), root))

    # 1. tau sweep
    sweep_scores: dict[float, Path] = {}
    for tau in plan.sweep.taus:
        tag = f"tau_{float(tau):g}"
        tdir, edir = root / "sweep" / tag, root / "sweep_eval" / tag
        steps.append(train_step(f"sweep-{tag}", tdir, lambda t=tau: ["loss=msl", f"loss.tau={t}",
                                                                      f"data.train_subset={plan.sweep.train_rows}"]))
        steps.append(eval_step(f"sweep-eval-{tag}", edir, lambda t=tdir: [
            f"run_dir={t}", f"shard={plan.sweep.eval_shard}", *eval_extra], [f"sweep-{tag}"]))
        sweep_scores[float(tau)] = edir
    tau_file = root / "tau.json"

    chosen: list[float] = []  # the sweep's tau, picked (and written to tau.json) once per driver run

    def msl_tau() -> list[str]:
        if not chosen:
            scores = {t: json.loads((d / "metrics.json").read_text()) for t, d in sweep_scores.items()}
            chosen.append(pick_tau(scores, plan.sweep.metric, float(plan.sweep.default_tau)))
            record = {"tau": chosen[0], "metric": plan.sweep.metric,
                      "scores": {str(t): s for t, s in scores.items()}}
            tau_file.write_text(json.dumps(record, indent=1) + "\n")
            listed = ", ".join(f"{t:g}: {s[plan.sweep.metric]:.4f}" for t, s in scores.items())
            print(f"MSL tau from the sweep: {chosen[0]:g} ({plan.sweep.metric}: {listed})", flush=True)
        return ["loss=msl", f"loss.tau={chosen[0]}"]

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
            steps.append(eval_step(f"eval-{loss}", edir, lambda t=tdir, w=save_w: [
                f"run_dir={t}", *users, w, *eval_extra], [f"train-{loss}"]))
            continue
        shards = [root / "shards" / f"{loss}-{i}" for i in range(n)]
        for i, sdir in enumerate(shards):
            steps.append(eval_step(f"eval-{loss}-{i}", sdir, lambda t=tdir, i=i, w=save_w: [
                f"run_dir={t}", *users, f"shard={i}/{n}", w, *eval_extra], [f"train-{loss}"]))
        steps.append(eval_step(f"merge-{loss}", edir, lambda t=tdir, sh=shards: [
            "merge=[" + ",".join(str(s) for s in sh) + "]", f"run_dir={t}"],
            [f"eval-{loss}-{i}" for i in range(n)], after=lambda sh=shards, e=edir: merge_w(sh, e)))
    for dec in plan.baselines:
        edir = root / "eval" / dec
        steps.append(eval_step(f"eval-{dec}", edir, lambda d=dec: [f"decoder={d}", *users, *eval_extra]))

    # 4. report and adapters
    def finish() -> None:
        from experiments.report import write_report
        from msl_rec.eval import best_checkpoint

        results = results_dir(plan, overrides, None) if results_out is None else results_out
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
    plan = load_plan(args.preset, args.overrides).compare
    results = results_dir(plan, args.overrides, root if args.out else None)
    steps, finish = build_steps(args.preset, args.overrides, root, results)
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
