"""resume=<run dir> (issue 19): a resume may change only the safe keys, every config group override is
recognised (budget=...), accepted changes are recorded, and the run continues from its last.ckpt."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from msl_rec.utils.config import PROJECT_ROOT
from msl_rec.utils.resume import SAFE_RESUME_KEYS, is_safe_resume_key, resume_config


def make_run(compose_train, run_dir: Path, *overrides: str) -> Path:
    """A run folder as training leaves it (no training needed here): .hydra/config.yaml and hydra.yaml
    (with the group choices), checkpoints/last.ckpt."""
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_train(*overrides, out=run_dir)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(HydraConfig.get())}),
                   run_dir / ".hydra" / "hydra.yaml")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    return run_dir


def resume(compose_train, run_dir: Path, *overrides: str):
    """What hydra_main does for ``msl-rec-train resume=<run_dir> <overrides>``."""
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_train(f"resume={run_dir}", *overrides, out=run_dir)
    return resume_config(cfg, [f"resume={run_dir}", *overrides], groups=dict(HydraConfig.get().runtime.choices))


def test_changed_settings_are_refused_with_a_diff_naming_each_key(compose_train, tmp_path):
    run = make_run(compose_train, tmp_path / "run", "trainer.max_epochs=2")
    saved = (run / ".hydra" / "config.yaml").read_text()
    with pytest.raises(ValueError, match="would make the run train something else") as err:
        resume(compose_train, run, "optim.lr=1e-3", "data.train_subset=4", "seed=7", "trainer.max_epochs=5",
               "+trainer.extra=1", "~trainer.deterministic")
    msg = str(err.value)
    for line in ("optim.lr: 0.0001 -> 0.001", "data.train_subset: 8 -> 4", "seed: 42 -> 7",
                 "trainer.extra: '<absent>' -> 1", "trainer.deterministic: False -> '<absent>'"):
        assert line in msg, msg
    assert "trainer.max_epochs:" not in msg  # a safe key is not part of the refusal
    assert (run / ".hydra" / "config.yaml").read_text() == saved
    assert not (run / ".hydra" / "resume_changes.jsonl").exists()


def test_safe_changes_are_applied_and_recorded(compose_train, tmp_path):
    run = make_run(compose_train, tmp_path / "run", "trainer.max_epochs=2")
    saved = (run / ".hydra" / "config.yaml").read_text()
    cfg = resume(compose_train, run, "trainer.max_epochs=5", "callbacks.step_checkpoint.every_n_train_steps=3",
                 "optim.lr=0.0001")  # the value the run already has: no change
    assert cfg.trainer.max_epochs == 5 and cfg.callbacks.step_checkpoint.every_n_train_steps == 3
    assert cfg.ckpt_path == str(run / "checkpoints" / "last.ckpt") and cfg.resume == str(run)
    assert (run / ".hydra" / "config.yaml").read_text() == saved  # the run's own record stays
    resume(compose_train, run, "trainer.max_epochs=7")
    lines = [json.loads(x) for x in (run / ".hydra" / "resume_changes.jsonl").read_text().splitlines()]
    assert [x["changes"] for x in lines] == [
        {"trainer.max_epochs": {"old": 2, "new": 5},
         "callbacks.step_checkpoint.every_n_train_steps": {"old": 0, "new": 3}},
        {"trainer.max_epochs": {"old": 2, "new": 7}}]  # each resume starts from the saved config
    assert all(x["time"] for x in lines)


@pytest.mark.parametrize("override", ["budget=cpu", "loss=lml", "debug=fdr", "experiment=books_lml", "dataset=toy"])
def test_every_group_override_is_refused(compose_train, tmp_path, override):
    run = make_run(compose_train, tmp_path / "run")
    with pytest.raises(ValueError, match="config group override"):
        resume(compose_train, run, override)


def test_the_group_option_the_run_used_is_accepted(compose_train, tmp_path):
    run = make_run(compose_train, tmp_path / "run", "loss=lml")
    assert resume(compose_train, run, "loss=lml", "backbone=tiny_llama").loss._target_.endswith("LMLLoss")


def test_resume_continues_from_last_ckpt_not_where_the_run_started(compose_train, tmp_path):
    run = make_run(compose_train, tmp_path / "run", f"ckpt_path={tmp_path / 'sft.ckpt'}")
    assert resume(compose_train, run).ckpt_path == str(run / "checkpoints" / "last.ckpt")
    other = run / "checkpoints" / "epoch_000.ckpt"
    assert resume(compose_train, run, f"ckpt_path={other}").ckpt_path == str(other)  # an explicit choice


def test_safe_key_list():
    assert "trainer.max_epochs" in SAFE_RESUME_KEYS
    assert is_safe_resume_key("logger.csv.save_dir") and is_safe_resume_key("extras.print_config")
    assert not is_safe_resume_key("optim.lr") and not is_safe_resume_key("loggerx") and not is_safe_resume_key("seed")


@pytest.mark.slow  # two CLI runs (~20 s); make test-full
def test_cli_resume_with_a_budget_override_is_refused(compose_train, tmp_path):
    # the group list comes from Hydra's choices in hydra_main: budget was missing from the old hand-kept list
    run = make_run(compose_train, tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "msl_rec.train", f"resume={run}", "budget=cpu"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    assert "config group override 'budget=cpu'" in proc.stderr, proc.stderr[-3000:]


def test_resume_runs_in_the_run_folder_only(tmp_path):
    from msl_rec.utils.resume import resume_argv

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(ValueError, match=r"drop hydra.run.dir=/elsewhere"):
        resume_argv([f"resume={tmp_path}", "hydra.run.dir=/elsewhere"])
    argv = resume_argv([f"resume={tmp_path}", f'hydra.run.dir="{tmp_path}"', "hydra.output_subdir=null"])
    assert argv[0] == f"hydra.run.dir={tmp_path}" and argv[-1] == "hydra.output_subdir=null"  # a DDP rank's win
