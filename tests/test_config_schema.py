"""Typed configs (msl_rec/utils/schema.py): a misspelt key or a wrong type fails at compose time naming the
key; every shipped config composes; components are built by instantiate from allowlisted targets only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from msl_rec.decoding import build_decoder, decoder_target
from msl_rec.losses import build_loss
from msl_rec.training.optim import build_optimizer
from msl_rec.utils.config import CONFIG_DIR, PROJECT_ROOT
from msl_rec.utils.registry import ConfigSecurityError
from msl_rec.utils.schema import ConfigSchemaError, check_schema

PRESETS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
OPTIONS = [(group, p.stem) for group in ("method", "model", "dataset", "backbone", "loss", "decoder", "trainer", "logger",
                                         "budget", "debug") for p in sorted((Path(CONFIG_DIR) / group).glob("*.yaml"))]


def _compose_error(compose, *overrides: str) -> str:
    """The composition error's text with its cause (where OmegaConf names the full key)."""
    with pytest.raises(ConfigCompositionException) as err:
        compose(*overrides)
    return f"{err.value} {err.value.__cause__}"


@pytest.mark.parametrize("app", ["train", "eval"])
@pytest.mark.parametrize("override, key", [("optim.lrr=1e-3", "optim.lrr"), ("loss.tua=2", "loss.tua"),
                                           ("dataset.trian_file=x.csv", "dataset.trian_file"),
                                           ("decoder.num_beam=4", "decoder.num_beam"), ("data.sampel=5", "data.sampel")])
def test_misspelt_key_on_the_command_line_names_it(compose_train, compose_eval, app, override, key):
    compose = compose_train if app == "train" else compose_eval
    assert key in _compose_error(compose, override)


@pytest.mark.parametrize("override, key", [("decoder.num_beams=abc", "decoder.num_beams"), ("optim.lr=fast", "optim.lr"),
                                           ("top_k=[1,x]", "top_k"), ("scoring.num_negatives=many", "scoring.num_negatives"),
                                           ("data.train_subset=1.5", "data.train_subset"), ("seed=abc", "seed")])
def test_wrong_type_names_the_key(compose_train, override, key):
    assert key in _compose_error(compose_train, override)


def test_a_sequential_models_settings_are_typed(compose_train):
    assert "model.hiden" in _compose_error(compose_train, "method=sasrec", "model.hiden=32")
    assert "model.hidden" in _compose_error(compose_train, "method=bert4rec", "model.hidden=wide")
    assert "loss.alpa" in _compose_error(compose_train, "method=sasrec", "loss=dros", "loss.alpa=2")


def test_wrong_type_in_eval_names_the_key(compose_eval):
    assert "subset" in _compose_error(compose_eval, "subset=abc")
    assert "resume" in _compose_error(compose_eval, "resume=maybe")


def test_misspelt_key_in_a_preset_names_it(compose_train, tmp_path):
    """A YAML preset (here one added through Hydra's search path) is merged onto the schema too."""
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text("# @package _global_\noptim:\n  learning_rate: 1.0e-3\n")
    text = _compose_error(compose_train, f"hydra.searchpath=[file://{tmp_path}]", "experiment=typo")
    assert "learning_rate" in text and "OptimConfig" in text


def test_misspelt_key_in_a_loss_option_names_it(compose_train, tmp_path):
    (tmp_path / "loss").mkdir()
    (tmp_path / "loss" / "msl_typo.yaml").write_text("defaults:\n  - schema_msl\n  - _self_\ntua: 2.0\n")
    text = _compose_error(compose_train, f"hydra.searchpath=[file://{tmp_path}]", "loss=msl_typo")
    assert "tua" in text and "MSLLossConfig" in text


def test_added_key_is_refused_before_the_job_runs(compose_train):
    """Hydra adds ``+key=`` even to a typed node; check_schema (the apps' SchemaCheck callback) names it."""
    cfg = compose_train("+loss.tua=2", "+optim.extra=1")
    with pytest.raises(ConfigSchemaError, match=r"loss\.tua, optim\.extra"):
        check_schema(cfg)
    check_schema(compose_train("+trainer.enable_progress_bar=false"))  # trainer is Lightning's open kwargs


@pytest.mark.slow  # a whole CLI process (~45 s on 2 busy cores)
def test_added_key_stops_the_cli_naming_it(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "msl_rec.train", "backbone=tiny_llama", "logger=none", "+loss.tua=2",
                           f"hydra.run.dir={tmp_path}"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode != 0
    assert "unknown config key(s) loss.tua" in proc.stderr + proc.stdout
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_composes_for_train_and_eval(compose_train, compose_eval, preset):
    for compose in (compose_train, compose_eval):
        cfg = compose(f"experiment={preset}")
        check_schema(cfg)
        assert "compare" not in cfg  # the comparison's settings are not training settings


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_shipped_option_composes(compose_train, compose_eval, group, option):
    check_schema(compose_train(f"{group}={option}"))
    if group != "debug":
        check_schema(compose_eval(f"{group}={option}"))


def test_one_scoring_node_and_one_top_k(compose_train, compose_eval):
    for cfg in (compose_train(), compose_eval()):
        assert dict(cfg.scoring) == {"target_logp": True, "num_negatives": 0, "seed": 0, "chunk_size": 32}
        assert list(cfg.top_k) == [1, 5, 10] and "top_k" not in cfg.decoder


def test_precedence_budget_then_experiment_then_command_line(compose_train):
    """Values: train.yaml < group options < budget < experiment < debug < the command line (README)."""
    assert compose_train("budget=cpu", "optim.global_batch_size=16").optim.lr == 5.0e-4  # budget over train.yaml
    cfg = compose_train("budget=cpu", "experiment=books_sdpo", "optim.global_batch_size=16")
    assert cfg.optim.lr == 1.0e-5 and cfg.trainer.max_epochs == 3  # the preset's recipe over the budget
    assert cfg.data.train_subset == 8  # ... and the command line (tiny overrides) over both
    assert compose_train("budget=cpu", "experiment=books_sdpo", "optim.lr=2e-5").optim.lr == 2.0e-5
    # a preset that picks a budget; the command line's budget wins over the preset's choice
    assert compose_train("experiment=cpu_budget").optim.lr == 5.0e-4
    assert compose_train("experiment=cpu_budget", "budget=none").optim.lr == 1.0e-4
    assert compose_train("experiment=demo", "debug=fdr").optim.global_batch_size == 2  # debug over the preset


# ----------------------------------------------------------------------------- instantiate + allowlist


def test_components_are_built_by_instantiate_from_their_configs(compose_train):
    cfg = compose_train("loss=msl", "loss.tau=2.5", "optim.lr=3e-3", "optim.betas=[0.8,0.99]")
    loss = build_loss(cfg.loss, cfg.backbone)
    assert type(loss).__name__ == "MSLLoss" and loss.tau == 2.5
    param = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer([param], cfg.optim)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["lr"] == 3e-3 and opt.defaults["betas"] == (0.8, 0.99)
    with pytest.raises(ValueError, match=r"optim.lr=0.0: must be > 0"):  # a value a type cannot express
        build_optimizer([param], {**cfg.optim, "lr": 0.0})


def test_targets_outside_the_allowlist_are_refused_before_building(tmp_path):
    marker = tmp_path / "ran"
    evil = {"_target_": "pathlib.Path.touch", "self": str(marker)}
    with pytest.raises(ConfigSecurityError, match="optim._target_"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], {**evil, "lr": 1e-3})
    with pytest.raises(ConfigSecurityError, match="decoder._target_"):
        build_decoder({**evil, "name": "x"}, catalog=None)
    with pytest.raises(ConfigSecurityError, match="loss._target_"):
        build_loss(evil)
    assert not marker.exists()


def test_checkpoints_on_disk_still_build():
    """The committed comparison's checkpoints: loss with _target_, decoder by name only, optim without _target_."""
    for ckpt in sorted((PROJECT_ROOT / "results" / "compare_cpu").glob("*.ckpt")):
        hp = torch.load(ckpt, weights_only=True)["hyper_parameters"]
        assert "_target_" not in hp["decoder"] and "_target_" not in hp["optim"], ckpt
        assert type(build_loss(hp["loss"], hp["backbone"])).__name__ in ("LMLLoss", "MSLLoss", "MSLATSLoss")
        assert decoder_target(hp["decoder"]) == "msl_rec.decoding.ConstrainedBeamSearch"
        opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], hp["optim"])
        assert isinstance(opt, torch.optim.AdamW) and opt.defaults["lr"] == hp["optim"]["lr"]
