"""What the terminal shows while a command runs: the training bar's metrics and evaluation's progress in
users (users/s, ETA)."""

from __future__ import annotations

import re


def test_training_progress_bar_shows_loss_tau_lr_and_tokens_per_s(compose_train):
    from msl_rec.train import train

    # two batches: tokens/s is measured from the second batch of an epoch on
    cfg = compose_train("loss=msl_ats", "trainer.fast_dev_run=2", "optim.warmup_steps=0")
    _, objects = train(cfg)
    trainer, module = objects["trainer"], objects["model"]
    shown = trainer.progress_bar_callback.get_metrics(trainer, module)  # the bar's postfix
    for key in ("train/loss_step", "train/tau", "train/lr", "train/tokens_per_s"):  # Lightning: loss_step
        assert key in shown, (key, sorted(shown))
    assert float(shown["train/tau"]) > 0 and float(shown["train/tokens_per_s"]) > 0
    bar = trainer.progress_bar_callback
    if hasattr(bar, "theme"):  # Rich's bar: the lr (5e-05 after one warm-up-free step) must not read 0.000
        assert f"{shown['train/lr']:{bar.theme.metrics_format}}" == f"{shown['train/lr']:.3g}" != "0.000"


def test_evaluation_progress_counts_users_not_batches(compose_eval, capsys):
    from msl_rec.eval import evaluate_app

    # 5 users in batches of 2, 2 and 1: the bar ends at 5/5 users (3 batches would read 3/3)
    evaluate_app(compose_eval("decoder=popularity", "subset=5", "data.eval_batch_size=2"))
    out = capsys.readouterr().out
    assert re.search(r"Evaluating users.*\b5/5 users \[elapsed [0-9:]+, ETA [0-9:]+, +[0-9.?]+ users/s\]", out), out
    assert "3/3" not in out


def test_user_progress_bar_counts_this_ranks_users():
    from msl_rec.evaluation.engine import rank_users

    batches = [[0, 1, 2], [3, 4, 5], [6, 7], [8]]
    assert rank_users(batches) == 9
    # rank 1 of 2 gets batches 1 and 3 (Lightning's UnrepeatedDistributedSampler)
    assert rank_users(batches, rank=1, world_size=2) == 4 and rank_users(batches, rank=0, world_size=2) == 5


def test_no_progress_bar_when_the_trainer_turns_it_off():
    from msl_rec.evaluation.engine import UserProgressBar, progress_callbacks

    assert progress_callbacks({"enable_progress_bar": False}, [[0]]) == []
    assert isinstance(progress_callbacks({}, [[0]])[0], UserProgressBar)


def _raw_amazon(tmp_path):
    """Reviews of items A-D by u1, u2, u4 (each >= 2), u3 with an untitled item E, u5 with F reviewed once:
    a 2-core keeps 9 interactions after two rounds (u3 and F, then u5)."""
    import json

    reviews = [("u1", "A", 1), ("u1", "B", 2), ("u1", "C", 3), ("u1", "D", 4), ("u2", "B", 5), ("u2", "A", 6),
               ("u2", "C", 7), ("u3", "A", 8), ("u3", "E", 9), ("u4", "D", 10), ("u4", "C", 11), ("u5", "F", 12),
               ("u5", "A", 13)]
    (tmp_path / "reviews.json").write_text("".join(
        json.dumps({"reviewerID": u, "asin": a, "unixReviewTime": t}) + "\n" for u, a, t in reviews))
    (tmp_path / "meta.json").write_text("".join(
        json.dumps({"asin": a, **({"title": a.lower()} if a != "E" else {})}) + "\n" for a in "ABCDEF"))
    return tmp_path / "reviews.json", tmp_path / "meta.json"


def test_preprocess_logs_each_step_with_counts(tmp_path, caplog, monkeypatch):
    import logging

    from msl_rec.data.preprocess import preprocess

    reviews, meta = _raw_amazon(tmp_path)
    monkeypatch.setattr("msl_rec.data.preprocess.LINES_PER_PROGRESS_LOG", 5)  # reading: a line every 5 lines
    with caplog.at_level(logging.INFO, logger="msl_rec.data.preprocess"):
        preprocess(reviews, meta, tmp_path / "out", k_core_min=2, window=3, split=[0.5, 0.25, 0.25])
    lines = [r.getMessage() for r in caplog.records if r.name == "msl_rec.data.preprocess"]
    reading = [line for line in lines if "lines read" in line]
    assert reading == [f"{meta}: 5 lines read", f"{reviews}: 5 lines read", f"{reviews}: 10 lines read"]
    lines = [line for line in lines if line not in reading]
    expected = [r"read metadata .*meta\.json: 5 items with a title \([0-9.]+ s\)",
                r"read reviews .*reviews\.json: 13 reviews, 12 of items with a title \([0-9.]+ s\)",
                r"2-core round 1: 10 of 12 interactions kept \(5 users, 5 items before the round\)",
                r"2-core round 2: 9 of 10 interactions kept",
                r"2-core round 3: 9 of 9 interactions kept",
                r"2-core: 9 interactions left \([0-9.]+ s\)",
                r"windows of up to 3 ids: 4 from 3 users and 4 items \([0-9.]+ s\)",
                r"split \[0.5, 0.25, 0.25\] by target time: train 2, valid 1, test 1",
                r"wrote id2name4Rec.json, train.csv, valid.csv, test.csv to .*out \([0-9.]+ s\)"]
    assert len(lines) == len(expected), lines
    for pattern, line in zip(expected, lines):
        assert re.match(pattern, line), (pattern, line)


def test_preprocess_help_lists_only_its_own_options(monkeypatch, capsys):
    import sys

    import pytest

    from msl_rec.preprocess import main

    monkeypatch.setattr(sys, "argv", ["msl-rec-preprocess", "--help"])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 0
    out = capsys.readouterr().out
    options = [line.split("=")[0].strip() for line in out.splitlines() if re.match(r"  [a-z_]+=\S* +\S", line)]
    assert options == ["reviews_file", "meta_file", "output_dir", "k_core", "window", "split", "overwrite"]
    for training_only in ("backbone", "experiment", "trainer", "loss:", "paths"):
        assert training_only not in out, training_only
