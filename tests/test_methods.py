"""The ``method`` group: sequential recommenders (SASRec, BERT4Rec, SASRec+DROS) trained and evaluated by the
same apps and pipeline as the LLM runs, checked against brute-force references; parts of the other kind refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from msl_rec.data.catalog import load_titles
from msl_rec.data.io import read_samples
from msl_rec.data.sequences import SequenceDataModule, TitleCatalog
from msl_rec.decoding.scores import ItemScoreRanker
from msl_rec.eval import evaluate_app
from msl_rec.metrics import ndcg_at_k
from msl_rec.train import train
from msl_rec.training.methods import check_method
from msl_rec.training.sequential import SeqLitModule
from msl_rec.utils.config import PROJECT_ROOT

BOOKS = PROJECT_ROOT / "data" / "books"
SEQ = ["trainer.num_sanity_val_steps=0", "data.micro_batch_size=32", "optim.global_batch_size=32",
       "data.eval_batch_size=16", "data.valid_subset=40", "top_k=[1,5,10]"]


# ---------------------------------------------------------------------------- composition
@pytest.mark.parametrize("overrides, message", [
    (["method=sasrec", "loss=lml"], "loss=lml is an LLM loss"),
    (["method=sasrec", "decoder=cbs_masked"], "decoder=cbs_masked decodes an LLM"),
    (["loss=bce"], "loss=bce is a sequential model's loss"),
    (["model=sasrec"], "model=sasrec is a sequential model"),
    (["decoder=item_scores"], "decoder=item_scores ranks a sequential model's scores"),
])
def test_parts_of_the_other_kind_of_method_are_refused(compose_train, overrides, message):
    with pytest.raises(ValueError, match=message):
        check_method(compose_train(*overrides))


def test_method_sets_its_parts_and_the_command_line_wins(compose_train):
    cfg = compose_train("method=sasrec", "loss=dros", "model.hidden=32")
    assert (cfg.method.kind, cfg.model._target_, cfg.model.hidden) == ("sequential", "msl_rec.models.SASRec", 32)
    assert (cfg.loss._target_, cfg.decoder.name, cfg.optim._target_) == ("msl_rec.losses.DROSLoss", "item_scores",
                                                                          "torch.optim.Adam")
    bert = compose_train("method=bert4rec")
    assert (bert.model._target_, bert.loss._target_) == ("msl_rec.models.BERT4Rec", "msl_rec.losses.CELoss")
    check_method(cfg)
    check_method(bert)
    assert compose_train().method.kind == "llm" and compose_train().model is None


# ---------------------------------------------------------------------------- data
def test_sequence_data_has_the_llm_runs_rows(compose_train):
    cfg = compose_train("method=sasrec", "model.max_len=4", "data.valid_subset=null")
    catalog = TitleCatalog.from_file(cfg.dataset.item_file, allow_empty_titles=True)
    dm = SequenceDataModule(cfg.dataset, catalog, max_len=4, eval_batch_size=7)
    dm.setup("validate")
    samples = read_samples(BOOKS / "valid.csv")
    assert [(s.user_id, s.target) for s in dm.eval_samples("valid")] == [(s.user_id, s.target) for s in samples]
    batch = next(iter(dm.eval_dataloader("valid", rows=[0, 5, 9])))
    for b, r in enumerate([0, 5, 9]):
        hist = samples[r].history[-4:]  # the last max_len items, oldest first, right-padded
        n = len(hist)
        assert batch["lengths"][b] == n
        assert catalog.item_ids[batch["history"][b, :n]].tolist() == list(hist)
        assert (batch["history"][b, n:] == catalog.num_items).all()
        assert catalog.item_ids[batch["targets"][b]] == samples[r].target == batch["target_ids"][b]


def test_title_groups_are_the_items_sharing_a_title():
    titles = load_titles(BOOKS / "id2name4Rec.json", allow_empty_titles=True)
    catalog = TitleCatalog(titles)
    by_title: dict[str, set[int]] = {}
    for i, t in titles.items():
        by_title.setdefault(t, set()).add(i)
    assert sorted(map(sorted, by_title.values())) == sorted(map(list, catalog.seq_items))
    assert sum(len(g) == 2 for g in catalog.seq_items) == 9  # Books: 9 titles shared by two ids
    assert all(catalog.seq_items[catalog.item_group[catalog.index_of[i]]] == tuple(sorted(by_title[t]))
               for i, t in titles.items())


# ---------------------------------------------------------------------------- the ranker
class FixedScores(torch.nn.Module):
    """A 'model' whose scores are a fixed row per user (row = user id)."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, history, lengths):
        return self.table[history[:, 0]]


def test_item_score_ranker_equals_a_brute_force_sort():
    titles = {10: "a", 11: "b", 12: "a", 13: "c", 14: "d", 15: "e"}  # items 10 and 12 share a title
    catalog = TitleCatalog(titles)
    gen = torch.Generator().manual_seed(0)
    table = torch.randint(0, 4, (3, 6), generator=gen).float()  # many ties
    ranker = ItemScoreRanker(catalog, num_results=4, top_k=[1, 2, 4])
    batch = {"history": torch.arange(3)[:, None], "lengths": torch.ones(3, dtype=torch.long),
             "user_ids": torch.arange(3)}
    got = ranker.rank(FixedScores(table), batch)
    for u in range(3):
        # brute force: each title's best item score, then best first, ties by the title's smallest item id
        best = {}
        for k, item in enumerate(catalog.item_ids.tolist()):
            g = catalog.item_seq[item]
            best[g] = max(best.get(g, -math.inf), float(table[u, k]))
        order = sorted(best, key=lambda g: (-best[g], min(catalog.seq_items[g])))[:4]
        assert [s for s, _ in got[u]] == order
        assert [sc for _, sc in got[u]] == [best[g] for g in order]


# ---------------------------------------------------------------------------- end to end
def _train_and_save(compose_train, run: Path, *overrides: str):
    cfg = compose_train(*SEQ, *overrides, out=run)
    _, objects = train(cfg)
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")  # what the Hydra app saves; run_dir= reads it
    return cfg, objects


def test_sasrec_trains_validates_and_evaluates_like_a_brute_force_scorer(compose_train, compose_eval, tmp_path):
    run = tmp_path / "run"
    _, objects = _train_and_save(compose_train, run, "method=sasrec", "data.train_subset=640", "trainer.max_epochs=2")
    best = json.loads((run / "metrics.json").read_text())
    out = tmp_path / "eval"
    # a smaller batch than validation's: nothing may change
    evaluate_app(compose_eval(f"run_dir={run}", "subset=40", "data.eval_batch_size=3", "top_k=[1,5,10]", out=out))
    evaluated = json.loads((out / "metrics.json").read_text())
    names = ["ndcg@1", "ndcg@5", "ndcg@10", "hr@1", "hr@5", "hr@10"]
    assert {k: best[k] for k in names} == {k: evaluated[k] for k in names}
    assert evaluated["n_users"] == 40 and evaluated["dtype"] == "float32"

    # brute force over the saved model: state . w_i + b_i for every item, best per title, sorted
    module = SeqLitModule.load_from_checkpoint(Path(json.loads((out / "eval_key.json").read_text())["ckpt_path"]))
    model = module.model.eval()
    catalog = objects["datamodule"].catalog
    samples = read_samples(BOOKS / "valid.csv")[:40]
    rows = {p["row"]: p for p in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    weight, bias = model.s_fc.weight.detach().double(), model.s_fc.bias.detach().double()
    ndcgs = []
    for r, s in enumerate(samples):
        hist = torch.tensor([catalog.indices(s.history[-10:]) + [catalog.num_items] * (10 - len(s.history[-10:]))])
        with torch.no_grad():
            state = model.encode(hist, torch.tensor([min(len(s.history), 10)]))[0].double()
        per_item = [float(state @ weight[i] + bias[i]) for i in range(catalog.num_items)]
        best = {}
        for k, item in enumerate(catalog.item_ids.tolist()):
            g = catalog.item_seq[item]
            best[g] = max(best.get(g, -math.inf), per_item[k])
        order = sorted(best, key=lambda g: (-best[g], min(catalog.seq_items[g])))[:10]
        assert rows[r]["ranked_ids"] == [list(catalog.seq_items[g]) for g in order], f"row {r}"
        np.testing.assert_allclose(rows[r]["scores"], [best[g] for g in order], rtol=0, atol=1e-4)
        rank = next((i for i, g in enumerate(order) if s.target in catalog.seq_items[g]), -1)
        assert rows[r]["rank"] == rank
        ndcgs.append(ndcg_at_k(rank, 10))
    assert evaluated["ndcg@10"] == pytest.approx(float(np.mean(ndcgs)), abs=1e-12)


@pytest.mark.parametrize("overrides", [("method=bert4rec",), pytest.param(("method=sasrec", "loss=dros"), marks=pytest.mark.slow),
                                       pytest.param(("method=sasrec", "loss=ce"), marks=pytest.mark.slow)])
def test_each_sequential_method_trains_and_its_run_evaluates(compose_train, compose_eval, tmp_path, overrides):
    run = tmp_path / "run"
    _train_and_save(compose_train, run, *overrides, "data.train_subset=256", "trainer.max_epochs=1")
    out = tmp_path / "eval"
    metrics, _ = evaluate_app(compose_eval(f"run_dir={run}", "subset=16", "top_k=[1,5,10]", out=out))
    assert 0.0 <= metrics["valid/ndcg@10"] <= 1.0
    key = json.loads((out / "eval_key.json").read_text())
    assert key["method"]["kind"] == "sequential" and key["decoder"]["name"] == "item_scores"
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 16


def test_a_sequential_checkpoint_is_refused_on_another_catalog(compose_train, compose_eval, tmp_path):
    run = tmp_path / "run"
    _train_and_save(compose_train, run, "method=sasrec", "data.train_subset=64", "trainer.max_epochs=1",
                    "trainer.limit_val_batches=0", "~callbacks.early_stopping",
                    "callbacks.last_checkpoint.save_on_train_epoch_end=true")
    titles = load_titles(BOOKS / "id2name4Rec.json", allow_empty_titles=True)
    titles[999999] = "an extra book"
    other = tmp_path / "items.json"
    other.write_text(json.dumps({str(k): v for k, v in titles.items()}))
    with pytest.raises(Exception, match="trained on a catalog of 6344 items"):
        evaluate_app(compose_eval(f"run_dir={run}", f"dataset.item_file={other}", "subset=4", "top_k=[1,5,10]",
                                  out=tmp_path / "eval"))


def test_a_resumed_sequential_run_equals_the_uninterrupted_one(compose_train, tmp_path):
    """The checkpoint holds the model, the optimizer and every RNG (DROS's sampled negatives, dropout): two
    epochs in one go and one epoch + a resume for the second give the same weights, bit for bit."""
    common = ("method=sasrec", "loss=dros", "data.train_subset=192", "data.valid_subset=8")
    train(compose_train(*SEQ, *common, "trainer.max_epochs=2", out=tmp_path / "whole"))
    train(compose_train(*SEQ, *common, "trainer.max_epochs=1", out=tmp_path / "first"))
    train(compose_train(*SEQ, *common, "trainer.max_epochs=2", f"ckpt_path={tmp_path / 'first/checkpoints/last.ckpt'}",
                        out=tmp_path / "second"))
    whole = torch.load(tmp_path / "whole/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    resumed = torch.load(tmp_path / "second/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    once = torch.load(tmp_path / "first/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert whole.keys() == resumed.keys() and any(not torch.equal(whole[k], once[k]) for k in whole)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
