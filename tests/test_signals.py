"""SIGTERM (issue 19): training writes last.ckpt at the current optimizer step and exits 143, and
resume= continues there; msl-rec-eval stops after the current batch and exits 143."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from msl_rec.decoding.baselines import RandomRanker
from msl_rec.eval import evaluate_app
from msl_rec.train import train
from msl_rec.training.module import RecLitModule
from msl_rec.utils.config import PROJECT_ROOT
from msl_rec.utils.signals import SIGTERM_EXIT_CODE

# 16 rows / micro batch 2 = 8 micro-batches per epoch; global batch 4: 2 per optimizer step, 4 steps
# per epoch. A constant lr: the resumed run may set another max_epochs than the interrupted one.
TRAIN = ["logger=csv", "+logger.csv.flush_logs_every_n_steps=1", "loss=lml", "data.train_subset=16",
         "optim.global_batch_size=4", "optim.schedule=constant", "trainer.limit_val_batches=1",
         "data.valid_subset=2", "callbacks.model_summary=null"]
ACCUMULATE, STEPS_PER_EPOCH = 2, 4


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONWARNINGS="ignore", WANDB_MODE="offline", WANDB_SILENT="true")


def _start(module: str, *overrides: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *overrides], cwd=PROJECT_ROOT, env=_env(),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


def _wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 240.0) -> None:
    """Poll ``condition()`` until true; the process ending first (or the timeout) fails the test."""
    end = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the process ended ({proc.returncode}) before the test could signal it:\n"
                        f"{log.read_text()[-3000:]}")
        if time.time() > end:
            proc.kill()
            pytest.fail(f"timed out waiting:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def _loss_rows(run_dir: Path) -> list[dict[str, str]]:
    rows = []
    for f in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        try:
            rows += [r for r in csv.DictReader(f.open()) if r.get("train/loss_step")]
        except (OSError, csv.Error):  # being written
            pass
    return rows


def _terminate(proc: subprocess.Popen, log: Path, timeout: int) -> int:
    """SIGTERM ``proc`` and its return code; a process still running after ``timeout`` s fails the test."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"SIGTERM did not stop the run:\n{log.read_text()[-3000:]}")


def _interrupt_training(run_dir: Path, tiny_overrides: list[str], after_rows: int = 5) -> dict:
    """Start a long training, SIGTERM it once ``after_rows`` losses are logged; the process's
    return code, its log and the last.ckpt it left."""
    log = run_dir.parent / f"{run_dir.name}.log"
    proc = _start("msl_rec.train", *tiny_overrides, *TRAIN, "trainer.max_epochs=1000",
                  f"hydra.run.dir={run_dir}", log=log)
    _wait_for(lambda: len(_loss_rows(run_dir)) >= after_rows, proc, log)
    rc = _terminate(proc, log, timeout=120)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True) if ckpt.is_file() else None
    return {"rc": rc, "log": log.read_text(), "state": state, "seen": after_rows}


def test_sigterm_saves_the_current_step_and_exits_non_zero(tmp_path, tiny_overrides):
    run = _interrupt_training(tmp_path / "run", tiny_overrides)
    assert run["rc"] == SIGTERM_EXIT_CODE, run["log"][-3000:]
    assert "SIGTERM: wrote" in run["log"] and "resume=" in run["log"]
    state = run["state"]
    assert state is not None, "no checkpoints/last.ckpt"
    # at (or after) the step the logged losses had reached when the signal was sent, not an older one:
    # no step checkpoints are configured, so only the SIGTERM save can be mid-epoch or past epoch 0
    logged = _loss_rows(tmp_path / "run")
    assert state["global_step"] >= int(logged[run["seen"] - 1]["step"]) > 0
    assert state["global_step"] == max(int(r["step"]) for r in logged) + 1  # every step before the save is logged
    done = state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"]
    # at an optimizer step: the micro-batches of a half-accumulated step are not lost
    assert done % ACCUMULATE == 0 and state["global_step"] == state["epoch"] * STEPS_PER_EPOCH + done // ACCUMULATE


def test_sigterm_mid_accumulation_saves_at_the_next_optimizer_step(compose_train, tmp_path, monkeypatch):

    step = RecLitModule.training_step
    seen = []

    def signal_at_third_batch(self, batch, batch_idx):
        seen.append(batch_idx)
        if len(seen) == 3:  # the first micro-batch of optimizer step 2 (2 micro-batches per step)
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(RecLitModule, "training_step", signal_at_third_batch)
    cfg = compose_train(*[o for o in TRAIN if "csv" not in o], "logger=none", "trainer.max_epochs=3")
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SIGTERMException) as stop:
        train(cfg)
    assert signal.getsignal(signal.SIGTERM) == handler  # restored once the run ended
    assert stop.value.code == SIGTERM_EXIT_CODE
    assert len(seen) == 4  # the step's second micro-batch ran, nothing after it
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (state["epoch"], state["global_step"]) == (0, 2)
    assert state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 4


def _losses_by_step(run_dir: Path) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for row in _loss_rows(run_dir):
        out.setdefault(int(row["step"]), []).append(float(row["train/loss_step"]))
    return out


@pytest.mark.slow  # three training processes
def test_sigterm_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_overrides, cli):
    run_dir, ref = tmp_path / "run", tmp_path / "ref"
    run = _interrupt_training(run_dir, tiny_overrides, after_rows=7)
    assert run["rc"] == SIGTERM_EXIT_CODE, run["log"][-3000:]
    epochs = run["state"]["epoch"] + 2
    cli("msl_rec.train", f"resume={run_dir}", f"trainer.max_epochs={epochs}")  # a safe change
    cli("msl_rec.train", *tiny_overrides, *TRAIN, f"trainer.max_epochs={epochs}", f"hydra.run.dir={ref}")
    want, got = _losses_by_step(ref), _losses_by_step(run_dir)
    assert sorted(want) == list(range(epochs * STEPS_PER_EPOCH))
    assert sorted(got) == sorted(want)
    for step in want:  # each micro-batch's loss, none twice, none missing
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == epochs * STEPS_PER_EPOCH


def test_eval_stops_after_the_current_batch_on_sigterm_and_the_same_command_continues(compose_eval, tmp_path,
                                                                                     monkeypatch):


    base = ("decoder=random", "subset=6", "data.eval_batch_size=2")  # 3 batches
    ranked, rank = [], RandomRanker.rank

    def signal_in_second_batch(self, model, batch):
        ranked.append(batch["user_ids"].tolist())
        if len(ranked) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return rank(self, model, batch)

    monkeypatch.setattr(RandomRanker, "rank", signal_in_second_batch)
    with pytest.raises(SIGTERMException) as stop:
        evaluate_app(compose_eval(*base))
    assert stop.value.code == SIGTERM_EXIT_CODE
    assert len(ranked) == 2  # the batch in progress finished, the third did not start
    written = [json.loads(x) for x in (tmp_path / "predictions.part0.jsonl").read_text().splitlines()]
    assert sorted(p["user_id"] for p in written) == sorted(u for b in ranked for u in b)
    assert not (tmp_path / "metrics.json").exists()
    assert json.loads((tmp_path / "failed.json").read_text())["type"] == "SIGTERMException"

    ranked.clear()
    evaluate_app(compose_eval(*base))  # the same command: only the third batch is left
    assert len(ranked) == 1
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 6
    assert not (tmp_path / "failed.json").exists()  # the finished run supersedes the interruption


@pytest.mark.slow  # two gloo processes
def test_sigterm_under_ddp_stops_every_rank_and_keeps_a_resumable_last_ckpt(tmp_path, tiny_overrides):
    """trainer=ddp_sim: the signal reaches rank 0, which forwards it to the rank Lightning started; both
    stop at the same step. Mid-epoch resume needs one process, so last.ckpt stays an epoch-end one."""
    run_dir = tmp_path / "run"
    log = tmp_path / "run.log"
    ddp = ["trainer=ddp_sim", "data.train_subset=32", "optim.global_batch_size=8", "trainer.max_epochs=1000",
           f"hydra.run.dir={run_dir}"]
    proc = _start("msl_rec.train", *tiny_overrides, *TRAIN, *ddp, log=log)
    # past epoch 0 (8 micro-batches per rank and epoch), whose end saved the last.ckpt to keep
    _wait_for(lambda: len(_loss_rows(run_dir)) >= 10, proc, log, timeout=400)
    rc = _terminate(proc, log, timeout=180)
    text = log.read_text()
    assert rc == SIGTERM_EXIT_CODE, text[-3000:]
    assert text.count("SIGTERM: ") == 2  # each rank reports its stop (the same step)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    progress = state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    assert progress["processed"] == 8  # 32 rows / 2 ranks / micro batch 2: an epoch's end
