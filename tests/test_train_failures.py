"""The train app never loses work and never succeeds wrongly (issue 11): failed checkpoint writes,
NaN runs, bad batch settings, a resume of a folder that is not a run, and the one selection metric."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from hydra.errors import ConfigCompositionException

from msl_rec.evaluation.runner import best_checkpoint
from msl_rec.train import grad_accumulation, train
from msl_rec.utils.resume import resume_argv

SHORT = ("debug=limit", "logger=none", "trainer.limit_train_batches=2", "data.valid_subset=2",
         "callbacks.model_summary=null")


def test_unwritable_checkpoint_folder_stops_the_run(compose_train, tmp_path, monkeypatch):
    # the folder refuses the write with PermissionError, as a read-only folder does for a non-root user;
    # Lightning's _atomic_save swallowed exactly this error, and the run exited 0 without checkpoints
    real_open = LocalFileSystem._open

    def refuse(self, path, mode="rb", *args, **kwargs):
        if "w" in mode and str(path).endswith(".ckpt"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(self, path, mode, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "_open", refuse)
    with pytest.raises(OSError, match=r"could not write the checkpoint .*checkpoints/.*\.ckpt"):
        train(compose_train(*SHORT, "trainer.max_epochs=1"))


def test_checkpoints_path_that_is_a_file_stops_the_run(compose_train, tmp_path):
    (tmp_path / "checkpoints").write_text("not a folder")
    with pytest.raises(OSError, match="checkpoints"):
        train(compose_train(*SHORT, "trainer.max_epochs=1"))


def test_nan_loss_stops_with_the_step_and_saves_nothing(compose_train, tmp_path, monkeypatch):
    from msl_rec.training.module import RecLitModule

    step = RecLitModule.training_step  # the first batch's loss is NaN, as a diverging run's would be
    monkeypatch.setattr(RecLitModule, "training_step",
                        lambda self, batch, i: step(self, batch, i) * (float("nan") if i == 0 else 1.0))
    with pytest.raises(FloatingPointError, match=r"non-finite .* at optimizer step 0 \(epoch 0, batch 0\)"):
        train(compose_train(*SHORT, "trainer.max_epochs=1", "callbacks.step_checkpoint.every_n_train_steps=1"))
    assert not list(tmp_path.glob("checkpoints/*.ckpt"))
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize(("gbs", "mbs", "world", "want"), [(8, 4, 1, 2), (8, 2, 2, 2), (4, 4, 1, 1)])
def test_grad_accumulation(compose_train, gbs, mbs, world, want):
    cfg = compose_train(f"optim.global_batch_size={gbs}", f"data.micro_batch_size={mbs}")
    assert grad_accumulation(cfg, world) == want


@pytest.mark.parametrize(("gbs", "mbs", "world"), [(3, 4, 1), (6, 4, 1), (4, 2, 4)])
def test_global_batch_not_a_multiple_is_an_error(compose_train, gbs, mbs, world):
    cfg = compose_train(f"optim.global_batch_size={gbs}", f"data.micro_batch_size={mbs}")
    with pytest.raises(ValueError, match=rf"optim.global_batch_size={gbs} .*data.micro_batch_size \({mbs}\)") as err:
        grad_accumulation(cfg, world)
    assert str(mbs * world) in str(err.value)  # the valid choices start at micro batch x world size


def test_non_integer_batch_size_names_the_key(compose_train):
    """A batch size that is not a whole number fails when the config is composed (DataConfig types it)."""
    for bad in ("abc", "2.5"):
        with pytest.raises(ConfigCompositionException) as err:
            compose_train(f"data.micro_batch_size={bad}")
        assert "data.micro_batch_size" in f"{err.value} {err.value.__cause__}"


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"\.hydra/config\.yaml"):
        resume_argv([f"resume={tmp_path}"])


def _last_step_losses(run_dir: Path) -> dict[int, float]:
    """epoch -> train/loss_step of its last step (what callback_metrics holds at that epoch's validation)."""
    out = {}
    for f in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        rows = [r for r in csv.DictReader(f.open()) if r.get("train/loss_step")]
        for row in sorted(rows, key=lambda r: int(r["step"])):
            out[int(row["epoch"])] = float(row["train/loss_step"])
    return out


def test_one_selection_metric_for_checkpoint_metrics_json_and_sweep(compose_train, tmp_path):
    # monitor = the last step's training loss, mode=max: on the tiny random model the val metrics are all 0,
    # this one varies by epoch, and its best epoch is not the last; every consumer must report that epoch
    cfg = compose_train(*SHORT, "logger=csv", "trainer.max_epochs=3", "optim.lr=3e-3",
                        "monitor.metric=train/loss_step", "monitor.mode=max")
    assert cfg.optimized_metric == "train/loss_step" and cfg.callbacks.model_checkpoint.monitor == "train/loss_step"
    metrics, _ = train(cfg)
    logged = _last_step_losses(tmp_path)
    assert sorted(logged) == [0, 1, 2]
    best_epoch = max(logged, key=logged.get)
    assert best_epoch != 2, logged  # the test is only meaningful when best != last

    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["monitor"] == {"metric": "train/loss_step", "mode": "max"}
    assert saved["epoch"] == best_epoch and saved["train/loss_step"] == pytest.approx(logged[best_epoch])
    assert metrics["train/loss_step"] == pytest.approx(logged[best_epoch])  # the sweep objective
    ckpt = tmp_path / saved["best_ckpt"]
    assert ckpt.is_file() and torch.load(ckpt, weights_only=True)["epoch"] == best_epoch
    # msl-rec-eval run_dir= takes the same file; a name sort would take the last epoch's
    assert best_checkpoint(tmp_path) == ckpt
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2  # last.ckpt is the latest state, whether or not the monitor improved


def test_eval_run_dir_reads_the_selection_from_last_ckpt_when_metrics_json_lacks_it(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for name in ("epoch_000.ckpt", "epoch_002.ckpt"):
        torch.save({"epoch": 0}, ckpts / name)
    state = {"monitor": "val/ndcg@10", "best_model_path": "/elsewhere/checkpoints/epoch_000.ckpt"}
    torch.save({"callbacks": {"ModelCheckpoint{'monitor': 'val/ndcg@10', 'mode': 'max'}": state,
                              "ModelCheckpoint{'monitor': None}": {"monitor": None,
                                                                   "best_model_path": str(ckpts / "last.ckpt")}}},
               ckpts / "last.ckpt")
    assert best_checkpoint(tmp_path) == ckpts / "epoch_000.ckpt"  # found by name after the folder moved
    (tmp_path / "metrics.json").write_text(json.dumps({"ndcg@10": 0.1, "best_ckpt": "checkpoints/epoch_002.ckpt"}))
    assert best_checkpoint(tmp_path) == ckpts / "epoch_002.ckpt"
    (tmp_path / "metrics.json").write_text(json.dumps({"best_ckpt": "checkpoints/gone.ckpt"}))
    with pytest.raises(FileNotFoundError, match="gone.ckpt"):
        best_checkpoint(tmp_path)


def test_eval_run_dir_without_checkpoint_or_config_is_an_error(tmp_path, compose_eval):
    from msl_rec.evaluation.runner import apply_run_dir

    with pytest.raises(FileNotFoundError, match=r"no checkpoint"):
        best_checkpoint(tmp_path)
    cfg = compose_eval(f"run_dir={tmp_path}")
    with pytest.raises(FileNotFoundError, match=r"\.hydra/config\.yaml"):
        apply_run_dir(cfg)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("trainer:\n  fast_dev_run: true\n")
    with pytest.raises(FileNotFoundError, match=r"a debug=fdr run .* saves no checkpoint; train with debug=limit"):
        best_checkpoint(tmp_path)


# --- issue 19: run folders, run ids, training length ------------------------------------------------------------


@pytest.mark.parametrize("value", ["../../x", "a/b", "..", ".hidden", "x y", "a..b", "/abs"])
def test_run_id_from_the_environment_must_be_one_folder_name(value):
    from msl_rec.utils.config import run_id

    with pytest.raises(ValueError, match="MSL_REC_RUN_ID"):
        run_id({"MSL_REC_RUN_ID": value})
    with pytest.raises(ValueError, match="TORCHELASTIC_RUN_ID"):
        run_id({"TORCHELASTIC_RUN_ID": value})
    assert run_id({"MSL_REC_RUN_ID": "lr_1e-4.seed-1"}) == "lr_1e-4.seed-1"


def test_a_locked_run_folder_names_the_holder(tmp_path):
    import os

    from msl_rec.utils.run_folder import RunFolderLock, RunStopped

    first = RunFolderLock(tmp_path).acquire()
    # flock locks belong to an open file: a second open, even in this process, is another holder
    with pytest.raises(RunStopped, match=rf"{tmp_path} is in use by another process \(pid {os.getpid()} "):
        RunFolderLock(tmp_path).acquire()
    first.release()
    RunFolderLock(tmp_path).acquire().release()


@pytest.mark.parametrize(("env", "launching"), [
    ({}, True), ({"RANK": "0", "LOCAL_RANK": "0"}, True), ({"SLURM_PROCID": "0"}, True),
    ({"LOCAL_RANK": "1"}, False),  # a rank Lightning's launcher started into rank 0's folder
    ({"RANK": "3", "LOCAL_RANK": "1"}, False), ({"SLURM_PROCID": "2"}, False), ({"NODE_RANK": "1"}, False)])
def test_only_the_launching_process_locks_and_checks_the_folder(env, launching):
    from msl_rec.utils.run_folder import is_launching_process

    assert is_launching_process(env) is launching


def test_a_new_run_into_a_used_folder_is_refused_before_hydra_writes(tmp_path, tiny_overrides):
    import subprocess
    import sys

    from msl_rec.utils.config import PROJECT_ROOT

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("the old run's config\n")
    (tmp_path / "metrics.json").write_text("{}\n")
    proc = subprocess.run([sys.executable, "-m", "msl_rec.train", *tiny_overrides, f"hydra.run.dir={tmp_path}"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    assert f"hydra.run.dir={tmp_path} already holds a training run (metrics.json)" in proc.stderr, proc.stderr[-3000:]
    assert f"resume={tmp_path}" in proc.stderr
    assert (tmp_path / ".hydra" / "config.yaml").read_text() == "the old run's config\n"
    assert not (tmp_path / "train.log").exists()


@pytest.mark.parametrize("key", ["trainer.max_epochs", "trainer.max_steps", "trainer.limit_train_batches"])
def test_a_run_that_would_train_nothing_is_an_error(compose_train, key):
    with pytest.raises(ValueError, match=rf"{key}=0: the run would train nothing"):
        train(compose_train(f"{key}=0"))
