"""The end of a multirun: a table of its jobs (printed, and <sweep dir>/summary.md) before the failed-job
exit; an Optuna sweep keeps its study in <sweep dir>/optuna.db and plots its history."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from msl_rec.utils.config import CONFIG_DIR


def _job(sweep: Path, num: int, overrides: list[str], ndcg: float | None = None, error: str | None = None) -> Path:
    folder = sweep / str(num)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("\n".join(f"- {o}" for o in overrides) + "\n")
    (folder / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {num}\n")
    (folder / ".hydra" / "config.yaml").write_text("monitor:\n  metric: val/ndcg@10\noptimized_metric: ${monitor.metric}\n")
    if ndcg is not None:  # a training run's metrics.json: validation keys without val/
        (folder / "metrics.json").write_text(json.dumps({"ndcg@10": ndcg, "hr@10": 0.5, "epoch": 0}))
    if error is not None:
        (folder / "failed.json").write_text(json.dumps({"error": error, "type": "ValueError", "overrides": overrides}))
    return folder


def test_multirun_prints_its_table_before_the_failed_jobs_stop_it(tmp_path, capsys):
    from hydra._internal.callbacks import Callbacks

    from msl_rec.utils.run_folder import RunStopped

    sweep = tmp_path / "sweep"
    _job(sweep, 0, ["loss.tau=1.5", "backbone=tiny_llama"], ndcg=0.125)
    _job(sweep, 1, ["loss.tau=2.5", "backbone=tiny_llama"], error="loss.tau=2.5: boom\nsecond line")
    _job(sweep, 2, ["loss.tau=4.5", "backbone=tiny_llama"])  # ran, but wrote no metric (no validation)
    _job(sweep, 10, ["loss.tau=3.5", "backbone=tiny_llama"], ndcg=0.25)
    # the Hydra callbacks exactly as configs/hydra/default.yaml lists them (Hydra runs end hooks in reverse)
    config = OmegaConf.create({
        "hydra": {"callbacks": OmegaConf.load(Path(CONFIG_DIR) / "hydra" / "default.yaml").callbacks,
                  "sweep": {"dir": str(sweep)}},
        "optimized_metric": "val/ndcg@10", "monitor": {"metric": "val/ndcg@10", "mode": "max"}})
    with pytest.raises(RunStopped, match="1 job"):
        Callbacks(config).on_multirun_end(config=config)
    printed = capsys.readouterr().out
    table = (sweep / "summary.md").read_text()
    assert table.strip() in printed
    rows = [line for line in table.splitlines() if line.startswith("| ")][2:]  # below the header
    # job order by number (10 after 1), the varying override per row, the common one listed once
    assert rows[0].startswith("| 0 | loss.tau=1.5 | 0.1250 | ok | ") and rows[0].endswith(f"{sweep / '0'} |")
    assert rows[1].startswith("| 1 | loss.tau=2.5 | - | failed: ValueError (loss.tau=2.5: boom) | ")
    assert rows[2].startswith("| 2 | loss.tau=4.5 | - | ok (no objective) | ")
    assert rows[3].startswith("| 10 | loss.tau=3.5 | 0.2500 | ok | ") and len(rows) == 4
    assert "overrides of every job: `backbone=tiny_llama`" in table and "4 job(s), 1 failed" in table
    assert "best: job 10 (0.2500, max): loss.tau=3.5" in table


def test_optuna_history_is_read_back_from_the_storage(tmp_path):
    import optuna

    from msl_rec.utils.optuna_study import best_so_far, plot_history, rdb_storage, study_history

    url = f"sqlite:///{tmp_path}/new/optuna.db"  # the folder does not exist yet
    study = optuna.create_study(study_name="s", storage=rdb_storage(url), direction="maximize")
    for value in (0.2, None, 0.1, 0.3):
        trial = study.ask()
        trial.suggest_float("tau", 1.0, 5.0)
        state = optuna.trial.TrialState
        study.tell(trial, value, state=state.FAIL if value is None else state.COMPLETE)
    # reopened from the file: every trial, failed one included (optuna 2.x + SQLAlchemy 2 lost the schema stamp)
    trials, direction = study_history(url, "s")
    assert [t["state"] for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"] and direction == "maximize"
    assert best_so_far([t["value"] for t in trials], direction) == [0.2, 0.2, 0.2, 0.3]
    assert best_so_far([0.2, None, 0.1], "minimize") == [0.2, 0.2, 0.1]
    png = plot_history(trials, direction, tmp_path / "h.png", "s", "val/ndcg@10")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000


def test_optuna_sweep_keeps_its_study_and_plots_it(tmp_path, tiny_overrides, monkeypatch, capsys):
    """A 2-trial ``experiment=tau_optuna`` sweep, in this process (Hydra's own multirun)."""
    import optuna
    import yaml

    from msl_rec.train import hydra_main
    from msl_rec.utils.optuna_study import rdb_storage

    sweep = tmp_path / "optuna"
    monkeypatch.setattr(sys, "argv", ["msl-rec-train", "-m", "experiment=tau_optuna", *tiny_overrides, "debug=fdr",
                                      "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}"])
    hydra_main()
    study = optuna.load_study(study_name="msl_tau", storage=rdb_storage(f"sqlite:///{sweep}/optuna.db"))
    assert len(study.trials) == 2 and all(t.state.name == "COMPLETE" for t in study.trials)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == study.best_value and best["best_params"] == study.best_params
    assert (sweep / "optimization_history.png").read_bytes()[:4] == b"\x89PNG"
    table = (sweep / "summary.md").read_text()
    assert table.strip() in capsys.readouterr().out
    taus = {t.number: t.params["loss.tau"] for t in study.trials}
    for num in (0, 1):
        assert f"| {num} | loss.tau={taus[num]} | {study.trials[num].value:.4f} | ok | " in table
