"""Issue 19's evaluation cases: each was silently wrong (or ran code from a file) before.

top_k beyond the ranked list, an eval key on the checkpoint's content, command-line overrides with
run_dir=, merging one folder, titles longer than max_new_tokens, what metrics.json records, and the
allowlist of classes a loaded config or checkpoint may name.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from msl_rec.eval import evaluate_app
from msl_rec.evaluation.key import eval_key
from msl_rec.evaluation.store import resume_predictions
from msl_rec.utils.config import PROJECT_ROOT
from msl_rec.utils.registry import ConfigSecurityError

VALID = PROJECT_ROOT / "data" / "books" / "valid.csv"


# ---------------------------------------------------------------------------- top_k
def test_top_k_beyond_the_beams_is_an_error_not_hr_at_10(compose_eval, compose_train, tmp_path):
    # before: hr@20 was reported, equal to hr@10 (10 beams rank 10 items)
    with pytest.raises(ValueError, match=r"K=20 .*num_beams=10"):
        evaluate_app(compose_eval("top_k=[1,5,20]", "subset=2"))
    with pytest.raises(ValueError, match=r"K=20 .*num_beams=10"):
        from msl_rec.train import train

        train(compose_train("top_k=[1,5,20]", out=tmp_path / "t"))
    for bad in ("[]", "[0,5]"):
        with pytest.raises(ValueError, match="top_k"):
            evaluate_app(compose_eval(f"top_k={bad}", "decoder=popularity", "subset=2"))
    assert not (tmp_path / "metrics.json").exists()


def test_top_k_is_set_in_one_place(compose_eval):
    # the decoder configs no longer carry their own cut-offs; an old config's must agree
    from msl_rec.decoding import decoder_settings

    for name in ("cbs", "cbs_masked", "popularity", "random"):
        assert "top_k" not in yaml.safe_load((PROJECT_ROOT / "configs" / "decoder" / f"{name}.yaml").read_text())
    _, kwargs = decoder_settings({"name": "cbs", "num_beams": 10, "top_k": [1, 5, 10]}, [1, 5, 10])
    assert kwargs["top_k"] == (1, 5, 10)
    with pytest.raises(ValueError, match="decoder.top_k=.*differs from top_k"):
        decoder_settings({"name": "cbs", "num_beams": 10, "top_k": [1, 5, 10]}, [1, 10])


def test_merge_checks_top_k_against_the_shards_lists(compose_eval, tmp_path):
    halves = [tmp_path / "s0", tmp_path / "s1"]
    for i, out in enumerate(halves):
        evaluate_app(compose_eval("decoder=popularity", "subset=4", f"shard={i}/2", out=out))
    with pytest.raises(ValueError, match="K=20"):
        evaluate_app(compose_eval(f"merge=[{halves[0]},{halves[1]}]", "top_k=[1,20]", out=tmp_path / "m"))
    with pytest.raises(ValueError, match="at least two"):  # before: "merged" one folder into a copy of itself
        evaluate_app(compose_eval(f"merge=[{halves[0]}]", out=tmp_path / "m1"))


# ---------------------------------------------------------------------------- eval key
def test_eval_key_is_the_checkpoint_content_not_its_path(compose_eval, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"model A")
    cfg = compose_eval(f"ckpt_path={ckpt}", "subset=2", out=tmp_path / "e")
    key_a = eval_key(cfg, range(2))
    ckpt.write_bytes(b"model B")  # replaced in place: another model under the same path
    key_b = eval_key(cfg, range(2))
    assert key_a["ckpt_sha256"] != key_b["ckpt_sha256"]
    for key in (key_a, key_b):
        assert key["prompt"]["instruction"] == cfg.dataset.instruction and key["prompt"]["cutoff_len"]
        assert key["train_file_sha256"] and key["item_file_sha256"]

    out = tmp_path / "e"
    expected = {0: (1, 2), 1: (3, 4)}
    resume_predictions(out, key_a, True, expected)
    (out / "predictions.jsonl").write_text(json.dumps({"row": 0, "user_id": 1, "target_id": 2, "rank": 0}) + "\n")
    with pytest.raises(ValueError, match="ckpt_sha256"):
        resume_predictions(out, key_b, True, expected)
    # the same content under another path is the same model: it resumes
    moved = tmp_path / "moved.ckpt"
    moved.write_bytes(b"model A")
    key_c = eval_key(compose_eval(f"ckpt_path={moved}", "subset=2", out=out), range(2))
    assert key_c["ckpt_path"] != key_a["ckpt_path"] and key_c["ckpt_sha256"] == key_a["ckpt_sha256"]
    assert len(resume_predictions(out, key_c, True, expected)) == 1


def test_changed_training_file_is_another_popularity_evaluation(compose_eval, tmp_path):
    train_file = tmp_path / "train.csv"
    shutil.copy(PROJECT_ROOT / "data" / "books" / "train_sample.csv", train_file)
    out = tmp_path / "e"
    evaluate_app(compose_eval("decoder=popularity", "subset=3", f"dataset.train_file={train_file}", out=out))
    lines = train_file.read_text().splitlines()
    train_file.write_text("\n".join(lines[:200]) + "\n")  # another training set: another popularity list
    with pytest.raises(ValueError, match="train_file_sha256"):
        evaluate_app(compose_eval("decoder=popularity", "subset=3", f"dataset.train_file={train_file}", out=out))


def test_merge_refuses_shards_of_different_checkpoints(compose_eval, tmp_path):
    from msl_rec.evaluation.store import check_mergeable

    ckpt = tmp_path / "m.ckpt"
    folders = []
    for i, content in enumerate((b"A", b"B")):
        ckpt.write_bytes(content)
        key = eval_key(compose_eval(f"ckpt_path={ckpt}", out=tmp_path / f"s{i}"), range(i * 5, i * 5 + 5))
        (tmp_path / f"s{i}").mkdir()
        (tmp_path / f"s{i}" / "eval_key.json").write_text(json.dumps(key))
        folders.append(tmp_path / f"s{i}")
    with pytest.raises(ValueError, match="ckpt_sha256"):
        check_mergeable(folders)


# ---------------------------------------------------------------------------- run_dir=
def _fake_run(compose_train, run, *overrides):
    """A training run folder: its composed config and a (stand-in) checkpoint."""
    cfg = compose_train(*overrides, out=run)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": {}}, run / "checkpoints" / "last.ckpt")
    return cfg


def test_run_dir_keeps_command_line_overrides(compose_train, compose_eval, tmp_path):
    from msl_rec.evaluation.runner import apply_run_dir

    run = tmp_path / "run"
    _fake_run(compose_train, run)
    other = tmp_path / "other_valid.csv"
    shutil.copy(VALID, other)
    cfg = compose_eval(f"run_dir={run}", f"dataset.valid_file={other}", out=tmp_path / "e")
    cfg = apply_run_dir(cfg, [f"run_dir={run}", f"dataset.valid_file={other}", "backbone=tiny_llama"])
    assert cfg.dataset.valid_file == str(other)  # before: silently the run's valid.csv
    assert cfg.dataset.name == "books" and cfg.ckpt_path.endswith("last.ckpt")
    with pytest.raises(ValueError, match="dataset=toy"):
        apply_run_dir(compose_eval(f"run_dir={run}", out=tmp_path / "e2"), [f"run_dir={run}", "dataset=toy"])


def test_run_dir_of_a_missing_folder_names_it(compose_eval, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run_dir=.*nowhere: no such folder"):
        evaluate_app(compose_eval(f"run_dir={tmp_path / 'nowhere'}", out=tmp_path / "e"))


# ---------------------------------------------------------------------------- titles and metrics.json
def test_max_new_tokens_defaults_to_the_longest_title(compose_eval, tmp_path):
    from msl_rec.data.build import build_data
    from msl_rec.data.catalog import warn_undecodable_titles
    from msl_rec.decoding import build_decoder

    cfg = compose_eval()
    _, catalog, _ = build_data(cfg)
    longest = max(len(s) for s in catalog.sequences)
    assert sum(len(s) > 64 for s in catalog.sequences) == 2  # the two Books titles 64 used to drop
    decoder = build_decoder(cfg.decoder, catalog, top_k=cfg.top_k)
    assert decoder.max_new_tokens == longest
    assert warn_undecodable_titles(catalog, decoder.max_new_tokens) == 0


def test_every_target_undecodable_is_an_error(compose_eval, tmp_path):
    # before: a warning, then NDCG 0 for every user
    with pytest.raises(ValueError, match=r"max_new_tokens=2: the target title of every one of the 3 users"):
        evaluate_app(compose_eval("decoder.max_new_tokens=2", "subset=3"))
    assert not (tmp_path / "metrics.json").exists()


def test_metrics_json_says_how_it_was_computed(compose_eval, tmp_path):
    evaluate_app(compose_eval("decoder=popularity", "subset=3", out=tmp_path / "pop"))
    saved = json.loads((tmp_path / "pop" / "metrics.json").read_text())
    assert saved["n_users"] == 3 and saved["num_negatives"] == 0 and saved["dtype"] is None
    assert saved["split"] == "valid" and saved["decoder"] == "popularity"

    out = tmp_path / "tiny"
    evaluate_app(compose_eval("subset=2", "decoder.num_beams=2", "top_k=[1,2]", "scoring.num_negatives=3", out=out))
    saved = json.loads((out / "metrics.json").read_text())
    key = json.loads((out / "eval_key.json").read_text())
    assert saved["num_negatives"] == 3 and "target_rank_sampled" in saved
    assert saved["dtype"] == key["dtype"] == "float32"
    assert saved["ckpt_sha256"] is None  # zero-shot: no checkpoint


# ---------------------------------------------------------------------------- allowlist
EVIL = "logging.FileHandler"  # constructing it creates the file it names: proof that it ran


def test_checkpoint_hyper_parameters_cannot_name_any_class(tmp_path):
    from msl_rec.training.module import RecLitModule

    marker = tmp_path / "ran"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {
        "backbone": {"name": "tiny_llama"}, "loss": {"_target_": EVIL, "filename": str(marker)}}}, ckpt)
    with pytest.raises(ConfigSecurityError, match=r"evil\.ckpt.*loss\._target_='logging\.FileHandler'"):
        RecLitModule.load_from_checkpoint(ckpt)
    assert not marker.exists()


def test_build_loss_takes_registered_losses_only(tmp_path):
    from msl_rec.training.module import build_loss

    marker = tmp_path / "ran"
    with pytest.raises(ConfigSecurityError, match="not a msl-rec loss"):
        build_loss({"_target_": EVIL, "filename": str(marker)})
    assert not marker.exists()
    assert type(build_loss({"_target_": "msl_rec.losses.MSLLoss", "tau": 1.5})).__name__ == "MSLLoss"


def test_edited_run_config_cannot_name_any_class(compose_train, compose_eval, tmp_path):
    from msl_rec.train import train
    from msl_rec.utils.resume import resume_config

    marker = tmp_path / "ran"
    run = tmp_path / "run"
    _fake_run(compose_train, run)
    saved = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    saved["callbacks"]["evil"] = {"_target_": EVIL, "filename": str(marker)}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigSecurityError, match=r"config\.yaml: callbacks\.evil\._target_"):
        train(resume_config(compose_train(f"resume={run}", out=run), []))
    assert not marker.exists()

    saved["callbacks"].pop("evil")
    saved["loss"] = {"_target_": EVIL, "filename": str(marker)}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigSecurityError, match=r"loss\._target_"):
        evaluate_app(compose_eval(f"run_dir={run}", out=tmp_path / "e"))
    assert not marker.exists()


def test_every_shipped_config_passes_the_allowlist(compose_train):
    """Every class the configs in configs/ name is in the allowlist (a new one must be added there)."""
    from msl_rec.utils.registry import check_targets

    for path in sorted((PROJECT_ROOT / "configs").rglob("*.yaml")):
        if "hydra" in path.relative_to(PROJECT_ROOT / "configs").parts:
            continue  # Hydra's own launcher/callback nodes: built by Hydra from the command, never from a run
        node = yaml.safe_load(path.read_text()) or {}
        node.pop("hydra", None)  # a preset's hydra.* (sweeper, launcher): Hydra's, built from the command only
        check_targets(node, source=str(path))
