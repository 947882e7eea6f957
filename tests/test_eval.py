"""The eval app on a Books subset: a no-model decoder, and the tiny model from a checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest

from msl_rec.eval import evaluate_app
from msl_rec.train import train


def test_popularity_needs_no_model(compose_eval, tmp_path, monkeypatch):
    from msl_rec.training import module

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

    from msl_rec.evaluation.runner import shard_range

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
    import pytest

    whole, halves = tmp_path / "whole", [tmp_path / "s0", tmp_path / "s1"]
    full, _ = evaluate_app(compose_eval("subset=5", "decoder.num_beams=4", "top_k=[1,2,4]",
                                        out=whole))
    for i, out in enumerate(halves):
        evaluate_app(compose_eval("subset=5", f"shard={i}/2", "decoder.num_beams=4", "top_k=[1,2,4]",
                                  out=out))
    assert [len(_predictions(h)) for h in halves] == [2, 3]
    merged, _ = evaluate_app(compose_eval(f"merge=[{halves[0]},{halves[1]}]", "top_k=[1,2,4]", out=tmp_path / "m"))
    a, b = _predictions(whole), _predictions(tmp_path / "m")
    assert [(p["user_id"], p["rank"], p["ranked_ids"]) for p in a] == [(p["user_id"], p["rank"], p["ranked_ids"]) for p in b]
    np.testing.assert_allclose([p["scores"] for p in a], [p["scores"] for p in b], atol=1e-4)
    # ranking metrics are exact; target_logp is a float mean over differently padded batches
    assert {k: v for k, v in merged.items() if "@" in k} == {k: v for k, v in full.items() if "@" in k}
    assert merged["valid/target_logp"] == pytest.approx(full["valid/target_logp"], rel=1e-5)


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
    # only the users not yet written (decoded in prompt-length order, written keyed by row)
    assert sorted(ranked) == sorted(p["user_id"] for p in expected[2:])
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
        evaluate_app(compose_eval(f"merge=[{tmp_path / 'nowhere'},{tmp_path / 'elsewhere'}]", out=tmp_path / "m"))


def test_resume_checks_saved_rows_against_the_split(compose_eval, tmp_path):
    """Duplicated lines, or a user that is not the split's at that row, stop the resume (they used
    to shift users silently, the line count being trusted); lines carry their split row."""
    import pytest

    base = ("decoder=random", "subset=6", "data.eval_batch_size=2")
    out = tmp_path / "run"
    evaluate_app(compose_eval(*base, out=out))
    preds = _predictions(out)
    assert [p["row"] for p in preds] == list(range(6))
    lines = (out / "predictions.jsonl").read_text().splitlines()

    (out / "predictions.jsonl").write_text("\n".join(lines[:3] + [lines[2]]) + "\n")
    with pytest.raises(ValueError, match=r"predictions.jsonl: line 4: row 2 again"):
        evaluate_app(compose_eval(*base, out=out))
    bad = json.loads(lines[1])
    bad["user_id"] += 1
    (out / "predictions.jsonl").write_text("\n".join([lines[0], json.dumps(bad)]) + "\n")
    with pytest.raises(ValueError, match=r"line 2: row 1 has user"):
        evaluate_app(compose_eval(*base, out=out))
    (out / "predictions.jsonl").write_text("\n".join([lines[1], lines[0]]) + "\n")
    with pytest.raises(ValueError, match=r"line 2: row 0 after row 1"):
        evaluate_app(compose_eval(*base, out=out))


def test_resume_rewrite_is_atomic(compose_eval, tmp_path, monkeypatch):
    """A failure while rewriting predictions.jsonl (dropping a torn line) keeps every earlier row."""
    import pytest

    base = ("decoder=random", "subset=6", "data.eval_batch_size=2")
    out = tmp_path / "run"
    evaluate_app(compose_eval(*base, out=out))
    lines = (out / "predictions.jsonl").read_text().splitlines()
    (out / "predictions.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])
    dumps = json.dumps

    def failing(obj, *a, **k):
        if isinstance(obj, dict) and "rank" in obj:
            raise OSError("disk full")
        return dumps(obj, *a, **k)

    monkeypatch.setattr(json, "dumps", failing)
    with pytest.raises(OSError, match="disk full"):
        evaluate_app(compose_eval(*base, out=out))
    assert (out / "predictions.jsonl").read_text().splitlines()[:4] == lines[:4]
    assert not list(out.glob(".predictions.jsonl.tmp*"))


def test_merge_refuses_overlaps_and_other_evaluations(compose_eval, tmp_path, caplog):
    import logging

    import pytest

    base = ("decoder=random", "subset=6", "data.eval_batch_size=2")
    for i in range(3):
        evaluate_app(compose_eval(*base, f"shard={i}/3", out=tmp_path / f"s{i}"))
    evaluate_app(compose_eval("decoder=random", "decoder.seed=1", "subset=6", "shard=1/3", out=tmp_path / "other"))
    s0, s2, other = (tmp_path / n for n in ("s0", "s2", "other"))
    with pytest.raises(ValueError, match="overlap"):  # merge=[a,a] used to count every user twice
        evaluate_app(compose_eval(f"merge=[{s0},{s0}]", out=tmp_path / "m"))
    with pytest.raises(ValueError, match="different evaluation.*decoder"):
        evaluate_app(compose_eval(f"merge=[{s0},{other}]", out=tmp_path / "m"))
    with caplog.at_level(logging.WARNING):
        evaluate_app(compose_eval(f"merge=[{s2},{s0}]", out=tmp_path / "m"))
    assert "[2, 4)" in caplog.text  # the gap is named
    merged = _predictions(tmp_path / "m")
    assert [p["row"] for p in merged] == [0, 1, 4, 5]


def test_empty_shard_is_an_error(compose_eval, tmp_path):
    import pytest

    with pytest.raises(ValueError, match=r"shard=0/20 selects no rows of the 8 valid rows"):
        evaluate_app(compose_eval("decoder=random", "subset=8", "shard=0/20"))
    assert not (tmp_path / "metrics.json").exists()


def test_popularity_on_test_and_run_dir_that_is_not_a_run(compose_eval, tmp_path):
    import pytest

    from msl_rec.utils.config import PROJECT_ROOT

    valid = PROJECT_ROOT / "data" / "books" / "valid.csv"
    metrics, _ = evaluate_app(compose_eval("decoder=popularity", "split=test", f"dataset.test_file={valid}",
                                           "subset=4", out=tmp_path / "t"))
    assert "test/hr@10" in metrics
    with pytest.raises(FileNotFoundError, match=r"\.hydra/config\.yaml \(not a msl-rec-train run folder\)"):
        evaluate_app(compose_eval(f"run_dir={tmp_path / 't'}", "subset=2", out=tmp_path / "r"))


def test_length_sorted_batches():
    from msl_rec.evaluation.runner import length_sorted_batches

    lens = [5, 1, 9, 1, 3]
    assert length_sorted_batches([0, 1, 2, 3, 4], lens, 2) == [[1, 3], [4, 0], [2]]
    assert length_sorted_batches([2, 0], lens, 8) == [[0, 2]]


def test_split_rows_name_each_row_once_and_drop_the_distributed_samplers_padding():
    """Over all ranks of a padded DistributedSampler, the named rows are every split row exactly once,
    each the row the loader actually yields; padding is None."""
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

    from msl_rec.evaluation.evaluate import split_rows

    for n, world, bs in ((5, 2, 2), (7, 3, 2), (4, 2, 4), (1, 2, 3)):
        named = []
        for rank in range(world):
            loader = DataLoader(list(range(n)), batch_size=bs,
                                sampler=DistributedSampler(list(range(n)), num_replicas=world, rank=rank, shuffle=False))
            for i, batch in enumerate(loader):
                rows = split_rows(loader, i, len(batch))
                assert all(r is None or r == x for x, r in zip(batch.tolist(), rows)), (n, world, bs)
                named += [r for r in rows if r is not None]
        assert sorted(named) == list(range(n)), (n, world, bs)
    plain = DataLoader(list(range(5)), batch_size=2)
    assert [split_rows(plain, i, len(b)) for i, b in enumerate(plain)] == [[0, 1], [2, 3], [4]]
    with pytest.raises(TypeError, match="RandomSampler"):  # a shuffled loader's rows cannot be named
        split_rows(DataLoader(list(range(5)), batch_size=2, sampler=RandomSampler(range(5))), 0, 2)


@pytest.mark.slow  # ~45 s: two CPU processes start Python, torch and the tiny model
def test_ddp_sim_eval_equals_one_process(cli, tmp_path):
    """trainer=ddp_sim: 2 gloo processes, each every other batch; one predictions.jsonl and
    metrics.json equal to a one-process run's (same batches, so the same numbers)."""
    args = ("backbone=tiny_llama", "logger=none", "subset=7", "data.eval_batch_size=2", "decoder.num_beams=4",
            "top_k=[1,2,4]", "scoring.num_negatives=3")
    one, two = tmp_path / "one", tmp_path / "two"
    cli("msl_rec.eval", *args, f"hydra.run.dir={one}")
    cli("msl_rec.eval", *args, "trainer=ddp_sim", f"hydra.run.dir={two}")
    assert (two / "predictions.jsonl").read_text() == (one / "predictions.jsonl").read_text()
    assert json.loads((two / "metrics.json").read_text()) == json.loads((one / "metrics.json").read_text())
    assert not list(two.glob("predictions.part*"))
    assert [p["row"] for p in _predictions(two)] == list(range(7))
