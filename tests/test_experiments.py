"""Every experiment preset composes and trains one step (tiny backbone, fast_dev_run); the report
turns finished runs into tables and plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from msl_rec.utils.config import PROJECT_ROOT

PRESETS = sorted(p.stem for p in (PROJECT_ROOT / "configs" / "experiment").glob("*.yaml"))
# a preset may pick its own backbone/trainer/logger (paper: LLaMA-3-8B on a GPU); the tiny CPU
# ones given after it on the command line win, as they would for a user
SMALL = ["backbone=tiny_llama", "trainer=cpu", "logger=none", "debug=fdr"]


def test_every_preset_documents_its_command():
    assert {"books_lml", "books_msl", "books_msl_ats", "books_sdpo", "ablation_tau", "ablation_alpha",
            "ablation_lr", "cpu_budget", "paper"} <= set(PRESETS)
    for name in PRESETS:
        lines = (PROJECT_ROOT / "configs" / "experiment" / f"{name}.yaml").read_text().splitlines()
        assert lines[0] == "# @package _global_", name
        assert lines[1].startswith("# msl-rec-train") or lines[1].startswith("# make demo"), name
        assert f"experiment={name}" in lines[1] or name == "demo", name


@pytest.mark.parametrize("name", PRESETS)
def test_preset_trains_one_step(name, compose_train, tmp_path):
    from msl_rec.train import train

    cfg = compose_train(f"experiment={name}", *SMALL)
    assert cfg.backbone.name == "tiny_llama"
    metrics, _ = train(cfg)
    assert any(k.startswith("train/loss") for k in metrics), metrics


def test_preset_values():
    from hydra import compose, initialize_config_dir

    from msl_rec.utils.config import CONFIG_DIR

    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        msl = compose("train.yaml", ["experiment=books_msl"])
        paper = compose("train.yaml", ["experiment=paper"])
        cpu = compose("train.yaml", ["experiment=books_lml", "budget=cpu"])
    assert msl.loss._target_.endswith("MSLLoss") and msl.loss.tau == 1.5
    assert paper.backbone.name == "llama3_8b" and paper.optim.global_batch_size == 128
    assert paper.trainer.max_epochs == 10 and paper.loss.eta == 0.25 and paper.decoder.num_beams == 10
    assert paper.backbone.lora.r == 8 and list(paper.backbone.lora.target_modules) == ["q_proj", "v_proj"]
    assert cpu.loss._target_.endswith("LMLLoss") and cpu.backbone.name == "smollm2_135m"


def _fake_run(root: Path, name: str, loss: dict, seed: int, ndcg10: float, steps: list[tuple[int, float, float]]):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"loss": loss, "seed": seed}))
    (run / "metrics.json").write_text(json.dumps({"ndcg@5": ndcg10 / 2, "ndcg@10": ndcg10, "hr@5": 0.1, "hr@10": 0.2}))
    csv_dir = run / "csv" / "version_0"
    csv_dir.mkdir(parents=True)
    rows = ["step,train/loss,train/tau,train/w_mean"] + [f"{s},{l},{t},0.5" for s, l, t in steps]
    (csv_dir / "metrics.csv").write_text("\n".join(rows) + "\n")
    return run


def _fake_eval(run: Path, ranks: list[int], logp: list[float] | None = None, first: list[int] | None = None,
               users: list[int] | None = None):
    """An evaluation's predictions.jsonl (and its metrics) beside a _fake_run's config."""
    import numpy as np

    from msl_rec.metrics import compute_metrics

    users = users or list(range(len(ranks)))
    first = first or [7] * len(ranks)
    with open(run / "predictions.jsonl", "w") as f:
        for i, r in enumerate(ranks):
            row = {"user_id": users[i], "target_id": 1000 + i, "rank": r, "ranked_ids": [[first[i]], [1]],
                   "scores": [0.0, -1.0]}
            if logp is not None:
                row["target_logp"] = logp[i]
            f.write(json.dumps(row) + "\n")
    metrics = compute_metrics(ranks)
    if logp is not None:
        metrics["target_logp"] = float(np.mean(logp))
    (run / "metrics.json").write_text(json.dumps(metrics))
    rng = np.random.default_rng(len(ranks))
    np.savez(run / "w_values.npz", w_lml=rng.random(50), w_msl=rng.random(50) ** 2, num_valid=rng.integers(1, 4, 50),
             tau=np.float64(1.0))


def test_report_tables_and_plots(tmp_path):
    from experiments.report import write_report

    lml = {"_target_": "msl_rec.losses.LMLLoss", "tau": 1.0}
    msl = {"_target_": "msl_rec.losses.MSLLoss", "tau": 1.5}
    msl2 = {"_target_": "msl_rec.losses.MSLLoss", "tau": 2.5}
    ats = {"_target_": "msl_rec.losses.MSLATSLoss"}
    curve = [(0, 4.0, 2.0), (1, 3.0, 2.5)]
    import numpy as np

    np.savez(_fake_run(tmp_path, "0", lml, 1, 0.10, curve) / "w_values.npz", w_lml=np.linspace(0, 1, 30),
             w_msl=np.linspace(0, 0.5, 30))
    _fake_run(tmp_path, "1", lml, 2, 0.20, curve)
    np.save(_fake_run(tmp_path, "2", msl, 1, 0.30, curve) / "w_values.npy", np.linspace(0, 0.7, 30))  # older format
    _fake_run(tmp_path, "3", msl2, 1, 0.25, curve)
    _fake_run(tmp_path, "4", ats, 1, 0.45, curve)
    text = write_report([tmp_path], tmp_path / "out").read_text()
    # LML: mean 0.15, sample std 0.0707 over two seeds; MSL(1.5) is +100% over it, MSL+ATS +200%
    assert "| LML | 2 |" in text and "0.1500 +- 0.0707" in text
    assert "| MSL (tau=1.5) | 1 |" in text and "0.3000 (+100.0%)" in text
    assert "0.4500 (+200.0%)" in text
    assert "## Metrics against tau" in text
    # Table 6: MSL's NDCG@10 at tau 1.5 and 2.5, LML's two seeds at tau 1 (mean +- sample std)
    assert "| MSL | ndcg@10 |  | 0.3000 | 0.2500 |" in text and "| LML | ndcg@10 | 0.1500 +- 0.0707 |  |  |" in text
    for png in ("ndcg_vs_tau.png", "training_curves.png", "w_distribution.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000


@pytest.mark.slow  # the same 2-trial sweep runs in-process in tests/test_sweeps.py, checked against its storage
def test_optuna_tau_sweep_maximises_the_validation_objective(tmp_path, tiny_overrides, cli):
    """The sweep's best is the trial with the highest objective, read back from each job's own
    metrics.json. The objective is the validation target_logp (higher is better, as tau_optuna's
    direction): unlike NDCG@10 (0 for every tau on the tiny model) it differs between taus, so a sweep
    that minimised, or that reported another job's value, fails here."""
    sweep = tmp_path / "optuna"
    cli("msl_rec.train", "-m", "experiment=tau_optuna", *tiny_overrides, "debug=fdr", "monitor.metric=val/target_logp",
        "monitor.mode=max", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}")
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    jobs = {}  # tau -> that job's objective, as its metrics.json (the best epoch's val/target_logp) holds it
    for j in (0, 1):
        tau = yaml.safe_load((sweep / str(j) / ".hydra" / "config.yaml").read_text())["loss"]["tau"]
        jobs[tau] = json.loads((sweep / str(j) / "metrics.json").read_text())["target_logp"]
    assert len(jobs) == 2 and len(set(jobs.values())) == 2, jobs  # two taus, two different objectives
    best_tau = max(jobs, key=jobs.get)
    assert result["best_params"]["loss.tau"] == best_tau
    assert result["best_value"] == pytest.approx(jobs[best_tau], rel=1e-6)
    assert 1.0 <= best_tau <= 5.0


def test_report_paired_comparison_with_lml(tmp_path):
    """Evaluations with predictions.jsonl: each loss against LML on the same users, per-user."""
    from experiments.report import write_report

    lml = {"_target_": "msl_rec.losses.LMLLoss", "tau": 1.0}
    msl = {"_target_": "msl_rec.losses.MSLLoss", "tau": 1.0}
    ats = {"_target_": "msl_rec.losses.MSLATSLoss"}
    n = 400
    miss = [-1] * n
    lml_ranks = [0 if i < 20 else -1 for i in range(n)]          # 20 hits at rank 0
    msl_ranks = [0 if i < 120 else -1 for i in range(n)]         # 100 more hits: a real gain
    ats_ranks = [0 if 20 <= i < 40 else -1 for i in range(n)]    # 20 hits on other users: no difference
    logp = [-50.0 + (i % 7) for i in range(n)]
    _fake_eval(_fake_run(tmp_path, "lml1", lml, 1, 0, []), lml_ranks, logp, first=[i % 3 for i in range(n)])
    _fake_eval(_fake_run(tmp_path, "lml2", lml, 2, 0, []), lml_ranks, logp)
    _fake_eval(_fake_run(tmp_path, "msl", msl, 1, 0, []), msl_ranks, [v + 2.0 for v in logp])
    _fake_eval(_fake_run(tmp_path, "ats", ats, 1, 0, []), ats_ranks)  # no target_logp: not compared on it
    _fake_eval(_fake_run(tmp_path, "nothing", msl | {"tau": 9.0}, 1, 0, []), miss)
    # a merged evaluation's key holds each shard's [lo, hi) rows
    (tmp_path / "msl" / "eval_key.json").write_text(json.dumps({"rows": [[0, 200], [200, 400]]}))
    text = write_report([tmp_path], tmp_path / "out").read_text()
    assert "## Paired comparison with LML (same users)" in text
    paired = text.split("## Paired comparison")[1].split("\n## ")[0]
    lines = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in paired.splitlines() if line.startswith("| ")}
    # MSL: NDCG@10 0.30 vs 0.05 (+0.25, exact), target_logp +2 on every user
    assert "| +0.2500 |" in lines[("MSL", "ndcg@10")] and lines[("MSL", "ndcg@10")].endswith("| model higher |")
    assert "| +2.0000 | [+2.0000, +2.0000] |" in lines[("MSL", "target_logp")]
    assert "| 400 | 1, 2 |" in lines[("MSL", "hr@10")]
    # MSL+ATS: the same number of hits on different users
    assert lines[("MSL+ATS", "ndcg@10")].endswith("| no detectable difference |")
    assert ("MSL+ATS", "target_logp") not in lines
    # no hit at all: -0.05 on the 20 users LML finds, so a CI below 0 (p = 2 / 2**20 exactly)
    assert lines[("MSL (tau=9)", "hr@10")].endswith("| model lower |")
    assert "| logp |" in text  # the target_logp column of the main table
    # distinct first titles: 3 for lml1 (0, 1, 2), 1 for the others
    assert "| `lml1` | LML | 1 | 0.0500 | 0.0500 | 3 |" in text and "| `msl` | MSL | 1 | 0.3000 | 0.3000 | 1 |" in text
    assert (tmp_path / "out" / "w_distribution.png").stat().st_size > 1000


def test_exported_comparison_redoes_the_report_without_its_outputs(tmp_path):
    """experiments.compare exports each run's configs, CSV logs and predictions (no checkpoints);
    the report over the copies, with the original folders gone, still pairs the users and finds the
    training curves through the rewritten run_dir."""
    import shutil

    from experiments.compare import export_runs
    from experiments.report import write_report

    root, n = tmp_path / "cmp", 200
    losses = {"lml": {"_target_": "msl_rec.losses.LMLLoss", "tau": 1.0}, "msl_ats": {"_target_": "msl_rec.losses.MSLATSLoss"}}
    for name, loss in losses.items():
        train = _fake_run(root / "train", name, loss, 42, 0, [(0, 4.0, 2.0), (1, 3.0, 2.5)])
        (train / "checkpoints").mkdir()
        (train / "checkpoints" / "last.ckpt").write_bytes(b"weights")
        ev = root / "eval" / name
        (ev / ".hydra").mkdir(parents=True)
        (ev / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"run_dir": str(train), "split": "valid"}))
        hits = 10 if name == "lml" else 60
        _fake_eval(ev, [0 if i < hits else -1 for i in range(n)], [-20.0 + (name != "lml") for _ in range(n)])
    runs = export_runs(root, tmp_path / "results" / "runs")
    shutil.rmtree(root)
    assert not list(runs.rglob("*.ckpt"))
    assert yaml.safe_load((runs / "eval" / "lml" / ".hydra" / "config.yaml").read_text())["run_dir"] == "../../train/lml"
    text = write_report([runs / "eval"], tmp_path / "out").read_text()
    lines = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in text.splitlines() if line.startswith("| ")}
    assert "| +0.2500 |" in lines[("MSL+ATS", "ndcg@10")]  # 60 vs 10 hits at rank 0 of 200 users
    assert "| +1.0000 | [+1.0000, +1.0000] |" in lines[("MSL+ATS", "target_logp")]
    assert (tmp_path / "out" / "training_curves.png").stat().st_size > 1000  # from the exported metrics.csv


def test_exported_adapter_drops_only_the_optimizer_state(tmp_path):
    import torch

    from experiments.compare import export_adapter

    w = {"model.lora_A": torch.randn(8, 4)}
    torch.save({"state_dict": w, "adapter": {"r": 8}, "optimizer_states": [{"state": {0: torch.randn(8, 4)}}]},
               tmp_path / "last.ckpt")
    out = torch.load(export_adapter(tmp_path / "last.ckpt", tmp_path / "lml.ckpt"), weights_only=True)
    assert set(out) == {"state_dict", "adapter"} and torch.equal(out["state_dict"]["model.lora_A"], w["model.lora_A"])
    assert not list(tmp_path.glob(".lml.ckpt.tmp*"))


def test_report_refuses_to_pair_different_users(tmp_path):
    from experiments.report import write_report

    lml = {"_target_": "msl_rec.losses.LMLLoss", "tau": 1.0}
    msl = {"_target_": "msl_rec.losses.MSLLoss", "tau": 1.0}
    _fake_eval(_fake_run(tmp_path, "a", lml, 1, 0, []), [0, -1, -1])
    _fake_eval(_fake_run(tmp_path, "b", msl, 1, 0, []), [0, -1, -1], users=[0, 5, 2])
    with pytest.raises(ValueError, match="row 1: .*user/target 1/1001.* has 5/1001"):
        write_report([tmp_path], tmp_path / "out")


def test_compare_pick_tau():
    from experiments.compare import pick_tau

    assert pick_tau({1.0: {"ndcg@10": 0.1}, 1.5: {"ndcg@10": 0.3}, 2.5: {"ndcg@10": 0.2}}, "ndcg@10", 1.5) == 1.5
    assert pick_tau({1.0: {"ndcg@10": 0.4}, 1.5: {"ndcg@10": 0.3}}, "ndcg@10", 1.5) == 1.0
    # ties: target_logp decides; without it, the default
    tied = {1.0: {"ndcg@10": 0.0, "target_logp": -30.0}, 2.5: {"ndcg@10": 0.0, "target_logp": -20.0},
            1.5: {"ndcg@10": 0.0, "target_logp": -25.0}}
    assert pick_tau(tied, "ndcg@10", 1.5) == 2.5
    assert pick_tau({1.0: {"ndcg@10": 0.0}, 1.5: {"ndcg@10": 0.0}}, "ndcg@10", 1.5) == 1.5


def compare_config(*overrides: str, name: str = "compare_cpu"):
    """The comparison's plan (experiments/configs/<name>.yaml) composed as a job would see it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "experiments" / "configs")):
        return compose(name, list(overrides))


def test_compare_app_failure_names_its_log(tmp_path):
    """A job whose app fails raises with the exit code and the app's log (the sweep then exits non-zero)."""
    import sys

    from experiments.compare import run_app

    log = tmp_path / "logs" / "train-lml.log"
    with pytest.raises(RuntimeError, match=rf"failed \(exit 5\); its output: {log}"):
        run_app([sys.executable, "-c", "print('boom'); raise SystemExit(5)"], log, threads=1)
    assert "boom" in log.read_text()


@pytest.mark.slow
def test_compare_sweep_and_report_end_to_end_tiny(tmp_path):
    """The whole comparison on the tiny backbone, as make compare runs it: the tau sweep, one job per model
    (two at a time), the report with adapters; the same commands again find everything done."""
    import subprocess
    import sys

    out = tmp_path / "cmp"
    train = ('train=["backbone=tiny_llama","data.train_subset=8","trainer.max_epochs=1",'
             '"optim.global_batch_size=4","optim.warmup_steps=1"]')
    plan = [f"out={out}", train, "sweep.train_rows=4", "sweep.eval_shard=867/868", "eval.users=6", "eval.save_w=[]"]
    app = [sys.executable, "-m", "experiments.compare", "-cn", "compare_cpu"]
    stages = [["-m", "stage=sweep", "tau=1.0,2.5"], ["-m", "stage=final", "model=lml,msl,msl_ats,popularity"],
              ["stage=report"]]

    def run(stage: list[str]) -> str:
        proc = subprocess.run([*app, *stage, *plan], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900,
                              check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return proc.stdout + proc.stderr

    for stage in stages:
        run(stage)
    tau = json.loads((out / "tau.json").read_text())
    assert tau["tau"] in (1.0, 2.5) and set(tau["scores"]) == {"1", "2.5"}
    msl_cfg = yaml.safe_load((out / "train" / "msl" / ".hydra" / "config.yaml").read_text())
    assert msl_cfg["loss"]["tau"] == tau["tau"] and msl_cfg["data"]["train_subset"] == 8
    results = out / "results"  # another out=: the committed results/compare_cpu is not touched
    for loss in ("lml", "msl", "msl_ats"):
        assert (results / f"{loss}.ckpt").stat().st_size > 0
        assert len((out / "eval" / loss / "predictions.jsonl").read_text().splitlines()) == 6
    text = (results / "results.md").read_text()
    assert "## Paired comparison with LML (same users)" in text and "| popularity |" in text
    assert (results / "tau_sweep" / "results.md").is_file()
    checkpoints = {p: p.stat().st_mtime_ns for p in out.rglob("*.ckpt")}
    again = run(stages[1])
    assert again.count("done already") == 4 and {p: p.stat().st_mtime_ns for p in out.rglob("*.ckpt")} == checkpoints


def test_compare_cpu_plan(tmp_path):
    """The cpu plan's jobs: the sweep on users the evaluation does not see, MSL at the sweep's tau,
    Fig. 5's w for LML and MSL only, popularity on the same users; an interrupted training resumes."""
    from experiments.compare import plan_runs, train_model
    from msl_rec.evaluation.runner import shard_range

    (train, targs), (edir, eargs) = plan_runs(compare_config("stage=sweep", "tau=2.5", f"out={tmp_path}"))
    assert train == tmp_path / "sweep" / "tau_2.5" and edir == tmp_path / "sweep_eval" / "tau_2.5"
    assert targs == ["experiment=compare_cpu", "loss=msl", "loss.tau=2.5", "data.train_subset=256"]
    assert "shard=33/34" in eargs and shard_range(3472, "33/34").start >= 1000  # disjoint from the eval users
    assert f"run_dir={train}" in eargs and "scoring.num_negatives=0" in eargs
    with pytest.raises(FileNotFoundError, match="no finished sweep evaluation; run stage=sweep first"):
        plan_runs(compare_config("stage=final", "model=msl", f"out={tmp_path}"))
    for tau, ndcg in ((1.0, 0.1), (2.5, 0.3)):
        (tmp_path / "sweep_eval" / f"tau_{tau:g}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "sweep_eval" / f"tau_{tau:g}" / "metrics.json").write_text(json.dumps({"ndcg@10": ndcg}))
    (train, targs), (edir, eargs) = plan_runs(compare_config("stage=final", "model=msl", f"out={tmp_path}"))
    assert targs[-2:] == ["loss=msl", "loss.tau=2.5"] and json.loads((tmp_path / "tau.json").read_text())["tau"] == 2.5
    assert {"subset=1000", "save_w=true", f"run_dir={tmp_path / 'train' / 'msl'}"} <= set(eargs)
    assert "save_w=false" in plan_runs(compare_config("stage=final", "model=msl_ats", f"out={tmp_path}"))[1][1]
    baseline, (edir, eargs) = plan_runs(compare_config("stage=final", "model=popularity", f"out={tmp_path}"))
    assert baseline is None and edir == tmp_path / "eval" / "popularity" and "decoder=popularity" in eargs
    assert "subset=1000" in eargs
    # an interrupted training with a checkpoint continues (resume=, with the job's overrides for the app to check)
    ran = []
    (tmp_path / "train" / "lml" / "checkpoints").mkdir(parents=True)
    (tmp_path / "train" / "lml" / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("experiments.compare.run_app", lambda cmd, log, threads: ran.append(cmd[3:]))
        train_model(tmp_path / "train" / "lml", ["experiment=compare_cpu", "loss=lml"], tmp_path / "l.log", 1)
    assert ran == [[f"resume={tmp_path / 'train' / 'lml'}", "experiment=compare_cpu", "loss=lml"]]


@pytest.mark.slow
def test_demo_end_to_end_tiny(cli):
    """make demo on the tiny backbone: one table, zero-shot / trained / popularity on the same users."""
    proc = cli("experiments.demo", "backbone=tiny_llama", "data.train_subset=8", "data.valid_subset=4",
               "optim.global_batch_size=4", "optim.warmup_steps=1", timeout=900)
    out = proc.stdout
    assert "4 validation users (the same for every row)" in out
    for row in ("MSL+ATS, 8 rows", "zero-shot (untrained)", "popularity"):
        assert any(line.startswith(row) and line.rstrip().split()[-2].endswith("/4") for line in out.splitlines()), row
    assert "target_logp" in out


def test_compare_plan_lives_outside_the_training_presets():
    """The training presets hold only training settings (their schema is strict); the comparison's
    plan is experiments/configs/compare_<preset>.yaml, where a misspelt key is an error naming it."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    from msl_rec.utils.config import CONFIG_DIR

    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        for preset in ("cpu", "gpu"):
            assert "compare" not in compose("train.yaml", [f"experiment=compare_{preset}"]), preset
    gpu = compare_config("stage=report", name="compare_gpu")
    assert gpu.eval.users is None and gpu.sweep.train_rows == 2000 and gpu.sweep.metric == "ndcg@10"
    with pytest.raises(ConfigCompositionException, match="eval.userz"):
        compare_config("eval.userz=3")
