"""experiments.report's training curves from a run logged with logger=wandb only (no CSV): read back from
the run's offline wandb file."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf


def test_training_curves_from_a_wandb_only_run(compose_train, tmp_path, monkeypatch):
    from experiments.report import load_curves, write_report
    from msl_rec.train import train
    from msl_rec.utils.wandb_files import raw_records as wandb_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    # three ATS steps, one small validation (2 beams: cheap) so the run has its metrics.json
    cfg = compose_train("logger=wandb", "loss=msl_ats", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
                        "trainer.limit_val_batches=1", "data.valid_subset=1", "decoder.num_beams=2", "top_k=[1,2]",
                        "monitor.metric=val/ndcg@2", "optim.warmup_steps=0", out=run)
    metrics, _ = train(cfg)
    assert not list(run.rglob("metrics.csv")) and list(run.glob("wandb/offline-run-*/run-*.wandb"))

    steps = [s for s in load_curves(run) if s.get("train/loss_step")]
    assert [s["step"] for s in steps] == ["0", "1", "2"]
    assert float(steps[-1]["train/loss_step"]) == pytest.approx(float(metrics["train/loss_step"]), rel=1e-6)
    assert all(float(s["train/tau"]) > 0 and float(s["train/tau_raw"]) > 0 for s in steps)

    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")  # as the train app leaves it
    write_report([run], tmp_path / "out")
    assert (tmp_path / "out" / "training_curves.png").stat().st_size > 1000

    # a run file cut off mid-record (a killed run) keeps its complete records; a damaged one is named
    wandb_file = next(run.glob("wandb/offline-run-*/run-*.wandb"))
    whole = wandb_file.read_bytes()
    n = len(wandb_records(wandb_file))
    wandb_file.write_bytes(whole[:-3])
    assert len(wandb_records(wandb_file)) == n - 1
    damaged = bytearray(whole)
    damaged[20] ^= 0xFF
    wandb_file.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=rf"{wandb_file}: corrupt record at byte \d+"):
        wandb_records(wandb_file)
