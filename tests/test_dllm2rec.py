"""DLLM2Rec (``method=dllm2rec``): the ranking distillation against the released code's lines, the teacher's lists
joined to the training rows (and refused when they are other rows), and a run trained, changed by its teacher
and evaluated end to end."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from msl_rec.data.io import read_samples
from msl_rec.data.sequences import TitleCatalog
from msl_rec.data.teacher import check_teacher_config, file_sha256, load_teacher
from msl_rec.eval import evaluate_app
from msl_rec.evaluation.runner import eval_data
from msl_rec.losses import BCELoss, DLLM2RecLoss, build_loss
from msl_rec.losses.sequential import propensity_scores, sample_negatives
from msl_rec.train import train
from msl_rec.utils.config import PROJECT_ROOT

BOOKS = PROJECT_ROOT / "data" / "books"
TRAIN, ITEMS = BOOKS / "train.csv", BOOKS / "id2name4Rec.json"
SEQ = ["trainer.num_sanity_val_steps=0", "data.micro_batch_size=32", "optim.global_batch_size=32",
       "data.eval_batch_size=16", "data.valid_subset=16", "top_k=[1,5,10]", "data.train_subset=64",
       "trainer.max_epochs=1"]


# ---------------------------------------------------------------------------- the released formula
def released_dllm2rec(model_output, target, target_neg, candidate, llm_confidence, ps, args):
    """DLLM2Rec main.py lines 406-491 as released (one negative per row), the BCE / DROS base included."""
    batch_size = model_output.shape[0]
    target, target_neg = target.view(batch_size, 1), target_neg.view(batch_size, 1)
    pos_scores = torch.gather(model_output, 1, target)
    neg_scores = torch.gather(model_output, 1, target_neg)
    scores = torch.cat((pos_scores, neg_scores), 0)
    labels = torch.cat((torch.ones((batch_size, 1)), torch.zeros((batch_size, 1))), 0).double()
    loss_all = torch.nn.BCEWithLogitsLoss()(scores, labels)
    if args.alpha != 0:
        pos_scores_dro = torch.squeeze(torch.gather(torch.mul(model_output * model_output, ps), 1, target))
        pos_loss_dro = torch.squeeze(torch.gather(torch.mul((model_output - 1) * (model_output - 1), ps), 1, target))
        inner_dro = (torch.sum(torch.exp(torch.mul(model_output * model_output, ps) / args.beta), 1)
                     - torch.exp(pos_scores_dro / args.beta) + torch.exp(pos_loss_dro / args.beta))
        loss_all = loss_all + args.alpha * torch.mean(torch.log(inner_dro + 1e-24))
    candidate = candidate[:, :args.candidate_topk]
    _K = args.candidate_topk
    weight_static = torch.exp(-torch.arange(1, _K + 1, dtype=torch.float64) / 1).unsqueeze(0).repeat(batch_size, 1)
    weight_rank = weight_static / torch.sum(weight_static, dim=1).unsqueeze(1)
    cf_rank_top = (-model_output).argsort(dim=1)[:, :_K]
    weight_com = (candidate.unsqueeze(2) == cf_rank_top.unsqueeze(1)).any(dim=2).int() + 1e-8
    weight_confidence = torch.exp(-llm_confidence[:, :_K]) + 1e-8
    weight_confidence = weight_confidence / torch.sum(weight_confidence, dim=1).unsqueeze(1)
    weight_fin = (args.gamma_position * weight_rank + args.gamma_confidence * weight_confidence
                  + args.gamma_consistency * weight_com)
    weight = weight_fin / torch.sum(weight_fin, dim=1).unsqueeze(1)
    loss_all_rd = 0
    for i_ in range(candidate.size(1)):
        target = candidate[:, i_:i_ + 1]
        pos_scores = torch.gather(model_output, 1, target)
        neg_scores = torch.gather(model_output, 1, target_neg)
        loss_bce_rd = -(torch.log(torch.sigmoid(pos_scores)) + torch.log(torch.sigmoid(1 - neg_scores)))
        if args.alpha != 0:
            pos_scores_dro = torch.squeeze(torch.gather(torch.mul(model_output * model_output, ps), 1, target))
            pos_loss_dro = torch.squeeze(torch.gather(torch.mul((model_output - 1) * (model_output - 1), ps), 1,
                                                      target))
            inner_dro_rd = (torch.sum(torch.exp(torch.mul(model_output * model_output, ps) / args.beta), 1)
                            - torch.exp(pos_scores_dro / args.beta) + torch.exp(pos_loss_dro / args.beta))
            loss_dro_rd = torch.log(inner_dro_rd + 1e-24)
            loss_all_rd += ((weight[:, i_:i_ + 1] * loss_bce_rd).mean()
                            + args.alpha * (weight[:, i_:i_ + 1] * loss_dro_rd).mean())
        else:
            loss_all_rd += (weight[:, i_:i_ + 1] * loss_bce_rd).mean()
    return loss_all + args.lam * loss_all_rd


def _example(rows=5, items=12, k=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, items, generator=gen, dtype=torch.float64) * 2
    targets = torch.randint(0, items, (rows,), generator=gen)
    teacher = torch.stack([torch.randperm(items, generator=gen)[:k] for _ in range(rows)])
    distance = torch.rand(rows, k, generator=gen, dtype=torch.float64).cumsum(dim=1) * 3
    counts = torch.randint(0, 9, (items,), generator=gen).double()
    return scores, targets, teacher, distance, counts


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_distillation_equals_the_released_code(alpha):
    scores, targets, teacher, distance, counts = _example()
    args = SimpleNamespace(lam=0.8, candidate_topk=3, gamma_position=0.3, gamma_confidence=0.5,
                           gamma_consistency=0.1, alpha=alpha, beta=1.0)
    loss_fn = DLLM2RecLoss(lam=0.8, candidate_topk=3, alpha=alpha)
    loss_fn.set_item_counts(counts)
    torch.manual_seed(7)
    got, metrics = loss_fn(scores, targets, teacher, distance)
    torch.manual_seed(7)
    negatives = sample_negatives(targets, scores.shape[1], 1)  # the draw the loss made
    ps = propensity_scores(counts).double()
    want = released_dllm2rec(scores, targets, negatives, teacher, distance, ps, args)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    assert metrics["taught"] == 1.0 and metrics["distill"] > 0


def test_a_row_without_a_list_gets_the_base_loss_only():
    scores, targets, teacher, distance, _ = _example(rows=4)
    args = SimpleNamespace(lam=0.8, candidate_topk=4, gamma_position=0.3, gamma_confidence=0.5,
                           gamma_consistency=0.1, alpha=0.0, beta=1.0)
    missing = teacher.clone()
    missing[2] = -1
    torch.manual_seed(3)
    got, metrics = DLLM2RecLoss(candidate_topk=4)(scores, targets, missing, distance)
    torch.manual_seed(3)
    negatives = sample_negatives(targets, scores.shape[1], 1)
    base = released_dllm2rec(scores, targets, negatives, teacher, distance, None, SimpleNamespace(**{**vars(args),
                                                                                                       "lam": 0.0}))
    per_row = [released_dllm2rec(scores[b:b + 1], targets[b:b + 1], negatives[b:b + 1], teacher[b:b + 1],
                                 distance[b:b + 1], None, args)
               - released_dllm2rec(scores[b:b + 1], targets[b:b + 1], negatives[b:b + 1], teacher[b:b + 1],
                                   distance[b:b + 1], None, SimpleNamespace(**{**vars(args), "lam": 0.0}))
               for b in (0, 1, 3)]  # each taught row's lam x distillation term, as released for it alone
    assert float(got) == pytest.approx(float(base + sum(per_row) / 4), rel=1e-6)
    assert metrics["taught"] == 0.75


def test_lam_zero_is_the_bce_loss_and_settings_are_checked():
    scores, targets, teacher, distance, _ = _example()
    torch.manual_seed(1)
    plain, _ = BCELoss()(scores, targets)
    torch.manual_seed(1)
    got, _ = DLLM2RecLoss(lam=0.0, candidate_topk=4)(scores, targets, teacher, distance)
    assert float(got) == float(plain)
    torch.manual_seed(1)
    assert float(DLLM2RecLoss()(scores, targets)[0]) == float(plain)  # validation: no teacher
    for key, value in (("lam", -1), ("candidate_topk", 0), ("gamma_position", -0.1), ("beta", 0)):
        with pytest.raises(ValueError, match=f"loss.{key}="):
            DLLM2RecLoss(**{key: value})
    with pytest.raises(ValueError, match="candidate_topk=5"):
        DLLM2RecLoss(candidate_topk=5)(scores, targets, teacher, distance)  # lists of 4
    cfg = OmegaConf.load(PROJECT_ROOT / "configs" / "loss" / "dllm2rec.yaml")
    built = build_loss({k: v for k, v in cfg.items() if k != "defaults"})
    assert (built.lam, built.candidate_topk, built.gammas, built.alpha) == (0.8, 10, (0.3, 0.5, 0.1), 0.0)


# ---------------------------------------------------------------------------- the teacher's lists
def write_teacher(folder: Path, samples, rows, catalog: TitleCatalog, split="train", train_file=TRAIN, seed=0,
                  width=10) -> Path:
    """An msl-rec-eval split=train folder as the app writes it: ``rows`` of ``samples`` ranked (random lists)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    lines = []
    for r in rows:
        ids = rng.choice(catalog.item_ids, size=width, replace=False).tolist()
        lines.append({"row": r, "user_id": samples[r].user_id, "target_id": samples[r].target, "rank": -1,
                      "ranked_ids": [[i] for i in ids], "scores": sorted(-rng.random(width), reverse=True),
                      "target_logp": -3.0})
    (folder / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in lines))
    key = {"split": split, "file": str(train_file), "file_sha256": file_sha256(train_file), "rows": [0, len(rows)],
           "item_file_sha256": file_sha256(ITEMS)}
    (folder / "eval_key.json").write_text(json.dumps(key))
    (folder / "metrics.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def books(tmp_path_factory):
    """Books' first 64 training rows (read from a copy of those rows: the same samples, fast) and catalog."""
    path = tmp_path_factory.mktemp("books") / "train64.csv"
    path.write_text("".join(TRAIN.read_text().splitlines(keepends=True)[:65]))
    return read_samples(path), TitleCatalog.from_file(ITEMS, allow_empty_titles=True)


def test_teacher_lists_join_the_training_rows(books, tmp_path, caplog):
    samples, catalog = books
    folder = write_teacher(tmp_path / "t", samples, [0, 1, 5], catalog, width=4)
    with caplog.at_level(logging.INFO, logger="msl_rec.data.teacher"):
        teacher = load_teacher(folder, samples[:8], catalog.index_of, TRAIN, ITEMS)
    assert "ranked lists for 3 of 8 training rows" in caplog.text
    assert teacher.taught.tolist() == [True, True, False, False, False, True, False, False]
    written = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    for r, p in zip([0, 1, 5], written):
        assert teacher.items[r].tolist() == catalog.indices([g[0] for g in p["ranked_ids"]])
        assert teacher.distance[r].tolist() == pytest.approx([-s for s in p["scores"]])
    assert (teacher.items[2] == -1).all() and teacher.shortest() == (4, 0)


@pytest.mark.parametrize("edit, message", [
    (lambda p, key: p[1].update(user_id=p[1]["user_id"] + 1), r"predictions.jsonl: line 2: row 1 has user"),
    (lambda p, key: p[0].update(ranked_ids=[[99999999]] * 10), "item id 99999999, which is not in the student's"),
    (lambda p, key: p.append(dict(p[0])), "row 0 again"),
    (lambda p, key: key.update(split="valid"), "split='valid'; the teacher must rank the training rows"),
    (lambda p, key: key.update(file_sha256="0" * 64), "but the student trains on"),
])
def test_a_teacher_of_other_rows_is_refused(books, tmp_path, edit, message):
    samples, catalog = books
    folder = write_teacher(tmp_path / "t", samples, [0, 1, 2], catalog)
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    key = json.loads((folder / "eval_key.json").read_text())
    edit(rows, key)
    (folder / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in rows))
    (folder / "eval_key.json").write_text(json.dumps(key))
    with pytest.raises(ValueError, match=message):
        load_teacher(folder, samples, catalog.index_of, TRAIN, ITEMS)


def test_teacher_and_loss_go_together(compose_train, tmp_path):
    tmp_path.joinpath("t").mkdir()
    with pytest.raises(ValueError, match="give method.teacher_run"):
        check_teacher_config(compose_train("method=dllm2rec"))
    with pytest.raises(ValueError, match="reads no teacher; use loss=dllm2rec"):
        check_teacher_config(compose_train("method=sasrec", f"+method.teacher_run={tmp_path / 't'}"))
    with pytest.raises(ValueError, match="data.sample=5 draws random training rows"):
        check_teacher_config(compose_train("method=dllm2rec", f"method.teacher_run={tmp_path / 't'}",
                                           "data.train_subset=null", "data.sample=5"))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        check_teacher_config(compose_train("method=dllm2rec", f"method.teacher_run={tmp_path / 'nope'}"))
    check_teacher_config(compose_train("method=dllm2rec", f"method.teacher_run={tmp_path / 't'}"))


def test_split_train_refuses_random_rows(compose_eval):
    with pytest.raises(ValueError, match="split=train with data.sample=5"):  # before any file is read
        eval_data(compose_eval("split=train", "data.sample=5"))


# ---------------------------------------------------------------------------- end to end
@pytest.fixture
def small_train(tmp_path) -> Path:
    """The first 64 rows of Books' train.csv (the student's training file; read in a blink)."""
    path = tmp_path / "train64.csv"
    path.write_text("".join(TRAIN.read_text().splitlines(keepends=True)[:65]))
    return path


def _train(compose_train, run: Path, *overrides: str):
    cfg = compose_train(*SEQ, *overrides, out=run)
    _, objects = train(cfg)
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return objects


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def test_dllm2rec_trains_with_its_teacher_and_evaluates(books, small_train, compose_train, compose_eval, tmp_path,
                                                        caplog):
    samples, catalog = books
    teacher = write_teacher(tmp_path / "teacher", samples, range(48), catalog, train_file=small_train)
    data = f"dataset.train_file={small_train}"
    with caplog.at_level(logging.INFO, logger="msl_rec.data.teacher"):
        _train(compose_train, tmp_path / "student", "method=dllm2rec", f"method.teacher_run={teacher}", data)
    assert "ranked lists for 48 of 64 training rows" in caplog.text
    _train(compose_train, tmp_path / "sasrec", "method=sasrec", data)
    student, sasrec = _weights(tmp_path / "student"), _weights(tmp_path / "sasrec")
    assert student.keys() == sasrec.keys()
    assert any(not torch.equal(sasrec[k], student[k]) for k in sasrec)  # the teacher changed training

    out = tmp_path / "eval"
    metrics, _ = evaluate_app(compose_eval(f"run_dir={tmp_path / 'student'}", "subset=8", "top_k=[1,5,10]", out=out))
    assert 0.0 <= metrics["valid/ndcg@10"] <= 1.0
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 8


def test_a_run_with_another_files_teacher_stops_before_training(books, small_train, compose_train, tmp_path):
    samples, catalog = books
    teacher = write_teacher(tmp_path / "teacher", samples, range(8), catalog)  # ranked train.csv's rows
    data = f"dataset.train_file={small_train}"
    with pytest.raises(ValueError, match="evaluate the teacher with dataset.train_file="):
        train(compose_train(*SEQ, "method=dllm2rec", f"method.teacher_run={teacher}", data, out=tmp_path / "run"))
    with pytest.raises(ValueError, match="give method.teacher_run"):
        train(compose_train(*SEQ, "method=dllm2rec", data, out=tmp_path / "run2"))


@pytest.mark.slow
def test_without_distillation_the_student_is_sasrec_exactly(books, small_train, compose_train, tmp_path):
    """loss.lam=0: the same weights as method=sasrec, bit for bit (the teacher changes nothing else: same rows,
    order, negatives and dropout)."""
    samples, catalog = books
    teacher = write_teacher(tmp_path / "teacher", samples, range(48), catalog, train_file=small_train)
    data = f"dataset.train_file={small_train}"
    _train(compose_train, tmp_path / "lam0", "method=dllm2rec", f"method.teacher_run={teacher}", "loss.lam=0", data)
    _train(compose_train, tmp_path / "sasrec", "method=sasrec", data)
    lam0, sasrec = _weights(tmp_path / "lam0"), _weights(tmp_path / "sasrec")
    assert lam0.keys() == sasrec.keys() and all(torch.equal(sasrec[k], lam0[k]) for k in sasrec)


@pytest.mark.slow
def test_an_llm_teacher_over_training_rows_teaches_a_student(compose_eval, compose_train, tmp_path):
    """The whole chain: a tiny LLM's msl-rec-eval split=train -> msl-rec-train method=dllm2rec -> msl-rec-eval."""
    teacher = tmp_path / "teacher"
    evaluate_app(compose_eval("split=train", "subset=6", f"dataset.train_file={TRAIN}", "decoder.num_beams=10",
                              out=teacher))
    key = json.loads((teacher / "eval_key.json").read_text())
    assert key["split"] == "train" and key["file_sha256"] == file_sha256(TRAIN)
    ranked = [json.loads(line) for line in (teacher / "predictions.jsonl").read_text().splitlines()]
    assert [(p["row"], p["user_id"], p["target_id"]) for p in ranked] == [
        (r, s.user_id, s.target) for r, s in enumerate(read_samples(TRAIN)[:6])]
    _train(compose_train, tmp_path / "student", "method=dllm2rec", f"method.teacher_run={teacher}")
    metrics, _ = evaluate_app(compose_eval(f"run_dir={tmp_path / 'student'}", "subset=4", "top_k=[1,5,10]",
                                           out=tmp_path / "eval"))
    assert 0.0 <= metrics["valid/ndcg@10"] <= 1.0
