"""build_decoder, the baselines, and evaluate()."""

from __future__ import annotations

import json

import pytest
import torch

from msl_rec.decoding import ConstrainedBeamSearch, PopularityRanker, RandomRanker, build_decoder
from msl_rec.evaluation import evaluate
from tests.decoding.conftest import rank

CONFIGS = "configs/decoder"


def load(name):
    """The decoder node a run composes with ``decoder=<name>`` (schema defaults included)."""
    import tempfile
    from pathlib import Path

    from tests.conftest import compose

    return compose("eval.yaml", ["backbone=tiny_llama", f"decoder={name}"], Path(tempfile.mkdtemp())).decoder


def test_build_from_configs(catalog):
    m = build_decoder(load("cbs_masked"), catalog)
    assert isinstance(m, ConstrainedBeamSearch) and m.mask == "before" and m.num_beams == 10 and m.needs_model
    c = build_decoder(load("cbs"), catalog)
    assert c.mask == "after" and c.length_penalty == 1.0
    assert isinstance(build_decoder(load("random"), catalog), RandomRanker)
    with pytest.raises(ValueError, match="train_targets"):
        build_decoder(load("popularity"), catalog)
    p = build_decoder(load("popularity"), catalog, train_targets=[101, 101, 103])
    assert isinstance(p, PopularityRanker) and not p.needs_model
    t = build_decoder({"_target_": "msl_rec.decoding.ConstrainedBeamSearch", "num_beams": 3, "top_k": [1]},
                      catalog)
    assert t.num_beams == 3
    with pytest.raises(ValueError, match="unknown"):
        build_decoder({"name": "nope"}, catalog)
    with pytest.raises(ValueError, match="num_beams"):
        build_decoder({"name": "cbs", "num_beams": 5}, catalog)  # top_k 10 > 5


def test_popularity_ranks_by_count_then_item_id(catalog, make_batch_fn):
    # 103 twice; 100 and 105 once each (tie -> smaller id); 102 and 123 share "the cab" -> 2
    targets = [103, 103, 105, 100, 102, 123]
    dec = PopularityRanker(catalog, targets, num_results=4)
    ranking = dec.rank(None, make_batch_fn(["a", "b"]))
    assert ranking[0] == ranking[1]
    seqs = [s for s, _ in ranking[0]]
    expected_items = [min(catalog.seq_items[s]) for s in seqs]
    assert expected_items == [102, 103, 100, 105]
    assert [sc for _, sc in ranking[0]] == [2.0, 2.0, 1.0, 1.0]


def test_random_is_seeded_per_user_and_distinct(catalog, make_batch_fn):
    dec = RandomRanker(catalog, seed=3)
    a = dec.rank(None, make_batch_fn(["x", "y", "z"]))
    b = dec.rank(None, make_batch_fn(["x", "y", "z"]))
    assert a == b and a[0] != a[1]
    assert all(len({s for s, _ in r}) == len(r) == 10 for r in a)


def test_evaluate_with_model(tiny_model, catalog, make_batch_fn, tmp_path):
    dec = ConstrainedBeamSearch(catalog, num_beams=10)
    batch = make_batch_fn(["hello", "books i like"], targets=[100, 123])
    first = rank(dec, tiny_model, batch)
    # make the targets: user 0 -> its 3rd sequence's item, user 1 -> a duplicate-title item if ranked
    t0 = catalog.seq_items[first[0][2][0]][0]
    batch["target_ids"] = torch.tensor([t0, 999999])
    tiny_model.train()
    res = evaluate(dec, tiny_model, [batch], catalog, scoring={"target_logp": False})  # prompt-only batch
    assert tiny_model.training  # mode restored
    assert res.ranks.tolist() == [2, -1]
    assert res.metrics["hr@1"] == 0.0 and res.metrics["hr@5"] == 0.5
    assert res.metrics["ndcg@10"] == pytest.approx(0.5 / 2.0)  # 1/log2(4) = 0.5, averaged over 2
    p = res.predictions[0]
    assert p["user_id"] == 0 and p["target_id"] == t0 and p["rank"] == 2
    assert p["ranked_ids"] == [list(catalog.seq_items[s]) for s, _ in first[0]]
    assert len(p["scores"]) == len(p["ranked_ids"]) == 10
    folder = res.save(tmp_path / "eval")
    lines = (folder / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["rank"] == -1
    assert json.loads((folder / "metrics.json").read_text()) == res.metrics


def test_evaluate_baseline_without_model(catalog, make_batch_fn):
    dec = PopularityRanker(catalog, [101, 101, 102])
    batch = make_batch_fn(["a", "b"], targets=[101, 123])  # 123 shares "the cab" with 102: a hit at rank 1
    res = evaluate(dec, None, [batch], catalog, top_k=(1, 2))
    assert res.ranks.tolist() == [0, 1]
    assert res.metrics == pytest.approx({"ndcg@1": 0.5, "ndcg@2": (1 + 1 / 1.5849625007211563) / 2,
                                          "hr@1": 0.5, "hr@2": 1.0})
