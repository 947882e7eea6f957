"""The training app end to end, small: tiny backbone, CPU, Books subsets, pytest tmp dirs."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from msl_rec.train import train
from msl_rec.training.module import RecLitModule
from msl_rec.utils.config import PROJECT_ROOT


@pytest.mark.parametrize("loss", ["lml", "msl", "msl_ats", "sdpo"])
def test_one_step_with_each_loss(compose_train, loss):
    cfg = compose_train(f"loss={loss}", "debug=fdr", "logger=none")
    metrics, objects = train(cfg)
    assert math.isfinite(metrics["train/loss_step"])
    assert "val/ndcg@10" in metrics and "val/hr@5" in metrics
    if loss == "msl_ats":
        assert "train/tau" in metrics
    trainable = [n for n, p in objects["model"].named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_training_runs_in_train_mode_with_lora_dropout(compose_train, monkeypatch):
    # from_pretrained returns an eval-mode model and Lightning keeps module modes: without
    # on_fit_start's train(), LoRA dropout would silently be off while training
    modes = []
    step = RecLitModule.training_step

    def spy(self, batch, batch_idx):
        drops = [m for n, m in self.model.named_modules() if n.endswith("lora_dropout.default")]
        modes.append((self.model.training, bool(drops) and all(m.training for m in drops)))
        return step(self, batch, batch_idx)

    import msl_rec.training.module as module_py

    build = module_py.build_backbone  # as from_pretrained (gguf, hub) hands it over: in eval mode
    monkeypatch.setattr(module_py, "build_backbone", lambda *a, **k: build(*a, **k).eval())
    monkeypatch.setattr(RecLitModule, "training_step", spy)
    train(compose_train("loss=lml", "debug=fdr", "logger=none"))
    assert modes and all(m == (True, True) for m in modes), modes


def test_checkpoint_keeps_adapter_and_reloads_to_identical_logits(compose_train, tmp_path):
    # warm-up 0: the one step runs at the full lr (a warm-up's first step runs at lr 0, as in HF)
    cfg = compose_train("loss=msl_ats", "debug=fdr", "logger=none", "optim.warmup_steps=0")
    _, objects = train(cfg)
    trainer, module, dm = objects["trainer"], objects["model"], objects["datamodule"]
    ckpt = tmp_path / "step1.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert state and all("lora_" in k or k.startswith("loss.") for k in state)
    assert any(k.startswith("loss.") for k in state)  # the ATS EMA of tau travels with the adapter

    batch = next(iter(dm.val_dataloader()))
    reloaded = RecLitModule.load_from_checkpoint(ckpt)
    module.eval(), reloaded.eval()
    with torch.no_grad():
        want = module(batch["input_ids"], batch["attention_mask"])
        got = reloaded(batch["input_ids"], batch["attention_mask"])
        with module.model.disable_adapter():
            base = module(batch["input_ids"], batch["attention_mask"])
    assert not torch.allclose(want, base)  # one step moved the adapter, so the check means something
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for k, v in module.loss.state_dict().items():
        torch.testing.assert_close(reloaded.loss.state_dict()[k], v)


def test_sdpo_starts_from_an_lml_checkpoint(compose_train, tmp_path):
    _, objects = train(compose_train("loss=lml", "debug=fdr", out=tmp_path / "sft"))
    sft = tmp_path / "sft.ckpt"
    objects["trainer"].save_checkpoint(sft)
    cfg = compose_train("experiment=books_sdpo", "debug=fdr", f"sdpo.sft_ckpt={sft}", out=tmp_path / "dpo")
    assert cfg.optim.lr == pytest.approx(1e-5)  # the S-DPO recipe's lr
    metrics, objects = train(cfg)
    assert objects["model"].hparams.sft_ckpt == str(sft)
    # policy == reference at the first step: S-DPO = -log sigmoid(-log sum_j e^0) = log(1 + 3 negatives)
    assert metrics["train/loss_step"] == pytest.approx(math.log(4), abs=1e-4)


def _losses(run_dir: Path) -> dict[int, list[float]]:
    """step -> every train/loss_step logged for it, over every CSV log version in a run folder."""
    out: dict[int, list[float]] = {}
    for f in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(f.open()):
            if row.get("train/loss_step"):
                out.setdefault(int(row["step"]), []).append(float(row["train/loss_step"]))
    return out


def _step_of(ckpt: Path) -> tuple[int, int]:
    state = torch.load(ckpt, weights_only=True)
    return state["epoch"], state["global_step"]


@pytest.mark.slow
def test_resume_continues_with_identical_losses(tmp_path, tiny_overrides, cli):
    """Mid-epoch (step checkpoint), epoch-boundary and finished-run resumes against one uninterrupted run."""
    common = [*tiny_overrides, "logger=csv", "loss=msl_ats", "trainer.limit_val_batches=1", "data.valid_subset=2",
              "callbacks.model_summary=null", "callbacks.step_checkpoint.every_n_train_steps=1",
              # a linear decay's length depends on max_epochs, which the resume extends
              "optim.schedule=constant"]
    full, half = tmp_path / "full", tmp_path / "half"
    last = half / "checkpoints" / "last.ckpt"
    cli("msl_rec.train", *common, "trainer.max_epochs=3", f"hydra.run.dir={full}")
    # stopped after 6 of 12 steps: in the middle of epoch 1 (8 rows / batch 2 = 4 steps per epoch)
    cli("msl_rec.train", *common, "trainer.max_epochs=3", "trainer.max_steps=6", f"hydra.run.dir={half}")
    assert _step_of(last) == (1, 6)
    cli("msl_rec.train", f"resume={half}", "trainer.max_steps=-1", "trainer.max_epochs=2")  # mid-epoch -> end of 1
    assert _step_of(last) == (1, 8)
    cli("msl_rec.train", f"resume={half}", "trainer.max_steps=-1")  # epoch boundary -> end of epoch 2
    assert _step_of(last) == (2, 12)
    cli("msl_rec.train", f"resume={half}", "trainer.max_steps=-1")  # a finished run: nothing is retrained
    want, got = _losses(full), _losses(half)
    assert sorted(want) == list(range(12)) and all(len(v) == 1 for v in want.values())
    assert sorted(got) == sorted(want) and all(len(v) == 1 for v in got.values()), got  # no step ran twice
    for step in want:
        assert got[step][0] == pytest.approx(want[step][0], rel=1e-5, abs=1e-6), step
    assert _step_of(last) == (2, 12)
    assert (half / ".hydra" / "config.yaml").is_file() and len(list((half / ".hydra").glob("resume-*"))) >= 1


def test_sweep_runs_every_job(tmp_path, tiny_overrides, cli):
    cli("msl_rec.train", "-m", *tiny_overrides, "loss=lml,msl", "debug=limit", "logger=csv", "trainer.max_epochs=1",
        "trainer.limit_train_batches=1", "data.valid_subset=2",
            f"hydra.sweep.dir={tmp_path}")
    jobs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and p.name.isdigit())
    assert jobs == ["0", "1"]
    # each job trained its own loss (not the same config twice), and each logged its own training losses
    targets = [yaml.safe_load((tmp_path / j / ".hydra" / "config.yaml").read_text())["loss"]["_target_"] for j in jobs]
    assert targets == ["msl_rec.losses.LMLLoss", "msl_rec.losses.MSLLoss"]
    first_loss = []
    for j in jobs:
        rows = list(csv.DictReader(next((tmp_path / j).glob("csv/version_*/metrics.csv")).read_text().splitlines()))
        first_loss.append(next(float(r[k]) for r in rows for k in r if k.startswith("train/loss") and r[k]))
    assert first_loss[0] != first_loss[1], first_loss  # LML's full softmax vs MSL's masked one
    # the sweep's table reports each job as ok, with its own metrics.json objective
    table = (tmp_path / "summary.md").read_text()
    for j, loss in zip(jobs, ("lml", "msl")):
        objective = json.loads((tmp_path / j / "metrics.json").read_text())["ndcg@10"]
        assert f"| {j} | loss={loss} | {objective:.4f} | ok | " in table, table


@pytest.mark.slow  # a 3-job sweep (~25 s); make test-full
def test_sweep_with_a_failed_job_runs_the_others_and_exits_non_zero(tmp_path, tiny_overrides):
    # job 1's global batch (3) is not a multiple of the micro batch (2): it fails at once, job 0 trains
    args = [o for o in tiny_overrides if not o.startswith("optim.global_batch_size")]
    proc = subprocess.run([sys.executable, "-m", "msl_rec.train", "-m", *args, "optim.global_batch_size=2,3",
                           "debug=limit", "logger=csv", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                           "data.valid_subset=2", f"hydra.sweep.dir={tmp_path}"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert (tmp_path / "0" / "metrics.json").is_file() and not (tmp_path / "0" / "failed.json").exists()
    failed = json.loads((tmp_path / "1" / "failed.json").read_text())
    assert set(failed) == {"error", "type", "overrides"}
    assert failed["type"] == "ValueError" and "optim.global_batch_size=3" in failed["error"]
    assert "optim.global_batch_size=3" in failed["overrides"]
    assert "1 job(s) of the sweep" in proc.stderr and f"{tmp_path / '1'}: ValueError" in proc.stderr


@pytest.mark.slow  # four trainings
def test_optuna_sweep_goes_on_after_a_failed_trial(tmp_path, tiny_overrides):
    # a NaN objective made optuna 2.10 + hydra-optuna-sweeper 1.3 abort the whole study; a failed job
    # returns None instead: the trial is FAIL, the study goes on, and the sweep exits non-zero at its end
    args = [o for o in tiny_overrides if not o.startswith("optim.global_batch_size")]
    proc = subprocess.run([sys.executable, "-m", "msl_rec.train", "-m", "experiment=tau_optuna", *args, "debug=fdr",
                           "hydra.sweeper.n_trials=4", "optim.global_batch_size=choice(2,3)",
                           f"hydra.sweep.dir={tmp_path}"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode != 0, proc.stderr[-3000:]
    jobs = sorted(p for p in tmp_path.iterdir() if p.name.isdigit())
    assert len(jobs) == 4, proc.stderr[-3000:]  # every trial ran
    failed = [j for j in jobs if (j / "failed.json").is_file()]
    assert failed and all("optim.global_batch_size=3" in json.loads((j / "failed.json").read_text())["overrides"]
                          for j in failed)
    assert all((j / "metrics.json").is_file() for j in jobs if j not in failed)
    result = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert result["best_params"]["optim.global_batch_size"] == 2
    assert f"{len(failed)} job(s) of the sweep" in proc.stderr


def test_ddp_sim_two_ranks_agree(tmp_path, tiny_overrides, cli):
    cli("msl_rec.train", *tiny_overrides, "trainer=ddp_sim", "loss=msl_ats", "debug=fdr", "logger=none",
        "data.train_subset=8", "optim.global_batch_size=4", f"hydra.run.dir={tmp_path}", timeout=400)
    ranks = [json.loads((tmp_path / "rank_state" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] and ranks[0] == ranks[1]  # the ATS tau EMA is identical on both ranks
