"""The eval app on a Books subset: a no-model decoder, and the tiny model from a checkpoint."""

from __future__ import annotations

import json

from msl_rec.eval import evaluate_app
from msl_rec.train import train


def test_popularity_needs_no_model(compose_eval, tmp_path, monkeypatch):
    import msl_rec.models.module as module

    def no_model(*a, **k):
        raise AssertionError("popularity must not load a model")

    monkeypatch.setattr(module.RecLitModule, "configure_model", no_model)
    cfg = compose_eval("decoder=popularity", "subset=4")
    metrics, _ = evaluate_app(cfg)
    assert set(metrics) >= {"valid/ndcg@10", "valid/hr@1"}
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved and len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 4


def test_tiny_model_from_checkpoint(compose_train, compose_eval, tmp_path):
    _, objects = train(compose_train("loss=msl", "debug=fdr", out=tmp_path / "train"))
    ckpt = tmp_path / "tiny.ckpt"
    objects["trainer"].save_checkpoint(ckpt)
    out = tmp_path / "eval"
    metrics, _ = evaluate_app(compose_eval(f"ckpt_path={ckpt}", "subset=2", "save_w=true", out=out))
    assert 0.0 <= metrics["valid/hr@10"] <= 1.0
    assert (out / "metrics.json").is_file() and (out / "predictions.jsonl").is_file()

    # w = 1 - P_valid(y) per response position against a dense computation: full logits at every
    # position, a dense (positions x vocabulary) boolean mask of each position's valid set
    import numpy as np
    import torch

    w = np.load(out / "w_values.npy")
    module, dm = objects["model"].eval(), objects["datamodule"]
    batch = next(iter(dm.val_dataloader()))
    n = min(2, batch["input_ids"].shape[0])
    expected = []
    with torch.no_grad():
        probs = module(batch["input_ids"], batch["attention_mask"]).softmax(-1)
    for b in range(n):
        resp = (batch["labels"][b] != -100).nonzero().flatten()
        for p, pos in enumerate(resp.tolist()):
            mask = torch.zeros(probs.shape[-1], dtype=torch.bool)
            ids = batch["valid_ids"][b, p]
            mask[ids[ids >= 0]] = True
            expected.append(1.0 - float(probs[b, pos - 1][mask].sum()))
    assert len(w) == len(expected)
    np.testing.assert_allclose(w, expected, atol=1e-5)
