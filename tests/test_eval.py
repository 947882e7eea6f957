"""The eval app on a Books subset: a no-model decoder, and the tiny model from a checkpoint."""

from __future__ import annotations

import json

import numpy as np

from msl_rec.eval import evaluate_app
from msl_rec.train import train


def test_popularity_needs_no_model(compose_eval, tmp_path, monkeypatch):
    from msl_rec.models import module

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

    # Fig. 5's w per response position against a dense computation: full logits at every position,
    # a dense (positions x vocabulary) boolean mask of each position's valid set, tau 1
    import numpy as np
    import torch

    saved = np.load(out / "w_values.npz")
    assert float(saved["tau"]) == 1.0
    module, dm = objects["model"].eval(), objects["datamodule"]
    batch = next(iter(dm.val_dataloader()))
    n = min(2, batch["input_ids"].shape[0])
    w_lml, w_msl, sizes = [], [], []
    with torch.no_grad():
        logits = module(batch["input_ids"], batch["attention_mask"])
    for b in range(n):
        resp = (batch["labels"][b] != -100).nonzero().flatten()
        for p, pos in enumerate(resp.tolist()):
            y = int(batch["labels"][b, pos])
            mask = torch.zeros(logits.shape[-1], dtype=torch.bool)
            ids = batch["valid_ids"][b, p]
            mask[ids[ids >= 0]] = True
            row = logits[b, pos - 1]
            w_lml.append(1.0 - float(row.softmax(-1)[y]))
            w_msl.append(1.0 - float(row.masked_fill(~mask, float("-inf")).softmax(-1)[y]))
            sizes.append(int(mask.sum()))
    assert len(saved["w_lml"]) == len(w_lml)
    np.testing.assert_allclose(saved["w_lml"], w_lml, atol=1e-5)
    np.testing.assert_allclose(saved["w_msl"], w_msl, atol=1e-5)
    np.testing.assert_array_equal(saved["num_valid"], sizes)
    multi = saved["num_valid"] > 1
    assert saved["w_msl"][multi].mean() < saved["w_lml"][multi].mean()


def _predictions(folder):
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


def test_shard_range_partitions_the_rows():
    import pytest

    from msl_rec.eval import shard_range

    for n_rows in (0, 1, 7, 3472):
        for n in (1, 2, 3, 5):
            parts = [shard_range(n_rows, f"{i}/{n}") for i in range(n)]
            assert [r for part in parts for r in part] == list(range(n_rows))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert shard_range(5, None) == range(5)
    for bad in ("2/2", "-1/2", "0/0", "half", "1"):
        with pytest.raises(ValueError, match="shard="):
            shard_range(5, bad)


def test_shards_merge_to_the_whole_split(compose_eval, tmp_path):
    """The tiny model on 5 users at once, and as shards 0/2 + 1/2 merged: same ranks and scores."""
    import numpy as np

    whole, halves = tmp_path / "whole", [tmp_path / "s0", tmp_path / "s1"]
    full, _ = evaluate_app(compose_eval("subset=5", "decoder.num_beams=4", "top_k=[1,2,4]", "decoder.top_k=[1,2,4]",
                                        out=whole))
    for i, out in enumerate(halves):
        evaluate_app(compose_eval("subset=5", f"shard={i}/2", "decoder.num_beams=4", "top_k=[1,2,4]",
                                  "decoder.top_k=[1,2,4]", out=out))
    assert [len(_predictions(h)) for h in halves] == [2, 3]
    merged, _ = evaluate_app(compose_eval(f"merge=[{halves[0]},{halves[1]}]", "top_k=[1,2,4]", out=tmp_path / "m"))
    a, b = _predictions(whole), _predictions(tmp_path / "m")
    assert [(p["user_id"], p["rank"], p["ranked_ids"]) for p in a] == [(p["user_id"], p["rank"], p["ranked_ids"]) for p in b]
    np.testing.assert_allclose([p["scores"] for p in a], [p["scores"] for p in b], atol=1e-4)
    assert merged == full


def test_interrupted_eval_resumes_after_the_last_batch(compose_eval, tmp_path, monkeypatch):
    import pytest

    from msl_rec.decoding.baselines import RandomRanker

    base = ("decoder=random", "subset=6", "data.eval_batch_size=2")
    evaluate_app(compose_eval(*base, out=tmp_path / "whole"))
    expected = _predictions(tmp_path / "whole")

    out = tmp_path / "run"
    evaluate_app(compose_eval(*base, out=out))
    lines = (out / "predictions.jsonl").read_text().splitlines()
    (out / "predictions.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])  # stopped mid-write

    ranked, rank = [], RandomRanker.rank

    def counting(self, model, batch):
        ranked.extend(batch["user_ids"].tolist())
        return rank(self, model, batch)

    monkeypatch.setattr(RandomRanker, "rank", counting)
    metrics, _ = evaluate_app(compose_eval(*base, out=out))
    assert ranked == [p["user_id"] for p in expected[2:]]  # only the users not yet written
    got = _predictions(out)
    assert [(p["user_id"], p["target_id"]) for p in got] == [(p["user_id"], p["target_id"]) for p in expected]
    assert metrics["valid/hr@10"] == pytest.approx(np.mean([0 <= p["rank"] < 10 for p in got]))

    with pytest.raises(ValueError, match="different evaluation"):  # another decoder, same folder
        evaluate_app(compose_eval("decoder=popularity", "subset=6", "data.eval_batch_size=2", out=out))
    ranked.clear()
    evaluate_app(compose_eval(*base, "resume=false", out=out))
    assert len(ranked) == 6 and len(_predictions(out)) == 6


def test_merge_names_a_missing_folder(compose_eval, tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="nowhere"):
        evaluate_app(compose_eval(f"merge=[{tmp_path / 'nowhere'}]", out=tmp_path / "m"))
