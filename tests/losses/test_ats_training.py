"""MSL+ATS inside the real training loop: tau moves once per optimizer step under gradient accumulation."""

from __future__ import annotations

import csv
import math

import pytest


@pytest.mark.slow
def test_ats_updates_once_per_optimizer_step_with_accumulation(compose_train, tmp_path):
    from msl_rec.train import train

    # 8 rows, micro-batch 2, global batch 4: accumulation 2, so 4 micro-batches = 2 optimizer steps
    cfg = compose_train("loss=msl_ats", "logger=csv", "optim.global_batch_size=4", "trainer.max_epochs=1",
                        "trainer.limit_val_batches=0", "callbacks.model_checkpoint.monitor=null",
                        "loss.ema=0.5", "loss.tau_min=0.01", "loss.tau_max=100")
    _, objects = train(cfg)
    loss = objects["model"].loss
    assert loss.stats_at == "widest" and int(loss.step) == 2  # tiny_llama: SmolLM2's tokenizer
    rows = [r for f in tmp_path.rglob("metrics.csv") for r in csv.DictReader(f.open())]
    taus = [float(r["train/tau"]) for r in rows if r.get("train/tau")]
    raws = [float(r["train/tau_raw"]) for r in rows if r.get("train/tau_raw")]
    ms = [float(r["train/ats_m"]) for r in rows if r.get("train/ats_m")]
    # Lightning writes step metrics once per optimizer step (the last micro-batch's value)
    assert len(taus) == 2 and len(raws) == 2 and len(ms) == 2
    # step 1 trains with ema_init, step 2 with the tau after step 1
    expected = 0.5 * 1.5 + 0.5 * min(max(raws[0], 0.01), 100)
    assert taus == [1.5, pytest.approx(expected)]
    assert float(loss.tau_ema) == pytest.approx(0.5 * expected + 0.5 * min(max(raws[1], 0.01), 100))
    assert all(m > 5 and math.isfinite(m) for m in ms)  # widest positions offer far more than the root's 5
