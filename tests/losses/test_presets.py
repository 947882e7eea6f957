"""The loss-related presets compose to what the paper and its released code did."""

from __future__ import annotations

import pytest

from msl_rec.losses import build_loss, loss_settings


def _compose(*overrides: str, hydra: bool = False):
    from hydra import compose, initialize_config_dir

    from msl_rec.utils.config import CONFIG_DIR

    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        return compose("train.yaml", list(overrides), return_hydra_config=hydra)


def test_paper_decodes_as_released():
    """Table 5 used transformers' post-softmax CBS (prefix_allowed_tokens_fn), 10 beams, 128 new tokens."""
    cfg = _compose("experiment=paper")
    assert cfg.decoder.name == "cbs" and cfg.decoder.mask == "after"
    assert cfg.decoder.num_beams == 10 and cfg.decoder.max_new_tokens == 128 and cfg.decoder.length_penalty == 1.0
    assert cfg.loss._target_.endswith("MSLATSLoss") and cfg.loss.ema_init == 1.5
    assert build_loss(cfg.loss, cfg.backbone).stats_at == "root"  # LLaMA-3's, as released


def test_paper_masked_is_fixed_tau_with_pre_softmax_cbs():
    cfg = _compose("experiment=paper_masked")
    paper = _compose("experiment=paper")
    assert cfg.decoder.name == "cbs_masked" and cfg.decoder.mask == "before"
    assert cfg.loss._target_ == "msl_rec.losses.MSLLoss" and cfg.loss.tau == 1.5
    for key in ("backbone", "optim", "trainer", "data"):  # everything else as experiment=paper
        assert cfg[key] == paper[key], key


def test_ablation_lr_sweeps_msl_without_temperature():
    cfg = _compose("experiment=ablation_lr", hydra=True)
    params = cfg.hydra.sweeper.params
    assert set(params["loss"].split(",")) == {"lml", "msl"} and len(params["optim.lr"].split(",")) >= 3
    for loss in ("msl", "lml"):  # what each job of the sweep composes
        job = _compose("experiment=ablation_lr", f"loss={loss}")
        assert job.loss.tau == 1.0 and "ATS" not in job.loss._target_


@pytest.mark.parametrize("backbone, expected", [("llama3_8b", "root"), ("smollm2_135m", "widest"),
                                                ("tiny_llama", "widest")])
def test_ats_stats_at_defaults_per_backbone(backbone, expected):
    """``loss.stats_at: null`` is the backbone's ``ats_stats_at``, resolved in one place (loss_settings),
    not by a cross-group interpolation in the loss config; an explicit value wins."""
    cfg = _compose(f"backbone={backbone}", "loss=msl_ats")
    assert cfg.loss.stats_at is None  # the loss config does not read the backbone's node
    assert loss_settings(cfg.loss, cfg.backbone)["stats_at"] == expected
    assert build_loss(cfg.loss, cfg.backbone).stats_at == expected
    explicit = _compose(f"backbone={backbone}", "loss=msl_ats", "loss.stats_at=root")
    assert build_loss(explicit.loss, explicit.backbone).stats_at == "root"
    assert build_loss(cfg.loss).stats_at == "root"  # no backbone given: the released code's root


def test_paper_inherits_hf_trainer_grad_norm_and_warmup_from_zero():
    """HF Trainer defaults the paper inherited: max grad norm 1.0; lr warm-up from 0 (tests/models)."""
    cfg = _compose("experiment=paper")
    assert cfg.trainer.gradient_clip_val == 1.0
    assert cfg.optim.lr == 1.0e-4 and cfg.optim.global_batch_size == 128 and cfg.trainer.max_epochs == 10
    assert _compose("experiment=books_msl").trainer.gradient_clip_val is None  # only the paper preset clips
