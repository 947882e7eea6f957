"""Validation during training and ``msl-rec-eval`` are one pipeline: for the same checkpoint and users,
the best epoch's ``val/*`` metrics equal ``msl-rec-eval run_dir=``'s ``metrics.json`` exactly."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from msl_rec.eval import evaluate_app
from msl_rec.train import train

DECODER = ("decoder.num_beams=4", "top_k=[1,2,4]")


def test_best_epoch_validation_metrics_equal_eval_metrics(compose_train, compose_eval, tmp_path):
    run = tmp_path / "run"
    # selected by target_logp (max): it moves every epoch, so the best epoch is a real choice
    cfg = compose_train("loss=msl", "trainer.max_epochs=2", "data.train_subset=2", "trainer.num_sanity_val_steps=0",
                        "data.valid_subset=3", "data.eval_batch_size=2",
                        "monitor.metric=val/target_logp", "monitor.mode=max", *DECODER, out=run)
    train(cfg)
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")  # what the Hydra app saves; run_dir= reads it
    best = json.loads((run / "metrics.json").read_text())

    out = tmp_path / "eval"
    evaluate_app(compose_eval(f"run_dir={run}", "subset=3", *DECODER, out=out))
    evaluated = json.loads((out / "metrics.json").read_text())
    key = json.loads((out / "eval_key.json").read_text())
    assert (run / best["best_ckpt"]).resolve() == Path(key["ckpt_path"]).resolve()
    assert evaluated["n_users"] == 3 and evaluated["num_negatives"] == 0

    names = ["ndcg@1", "ndcg@2", "ndcg@4", "hr@1", "hr@2", "hr@4", "target_logp"]
    # exactly equal: the same rows through the same summarize(), not a float32 mean of batch means
    assert {k: best[k] for k in names} == {k: evaluated[k] for k in names}
    assert "target_rank_sampled" not in best and "target_rank_sampled" not in evaluated  # off by default
