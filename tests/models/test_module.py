"""RecLitModule pieces beside the steps: the lr schedule (HF's, warm-up capped to the run), the optim
settings checks, the S-DPO recipe's composition."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from msl_rec.training.module import RecLitModule
from msl_rec.training.optim import build_lr_schedule, build_optimizer
from msl_rec.utils.config import CONFIG_DIR
from tests.conftest import compose


def _lrs(schedule, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(schedule.get_last_lr()[0])
        schedule.optimizer.step()
        schedule.step()
    return out


@pytest.mark.parametrize("warmup,total", [(4, 10), (0, 5), (20, 100)])
def test_linear_schedule_is_hf_trainers(warmup, total):
    from transformers import get_linear_schedule_with_warmup

    def opt():
        return build_optimizer([torch.nn.Parameter(torch.zeros(1))], {"lr": 1e-4})

    got = _lrs(build_lr_schedule(opt(), {"warmup_steps": warmup, "schedule": "linear"}, total), total)
    want = _lrs(get_linear_schedule_with_warmup(opt(), warmup, total), total)
    assert got == pytest.approx(want, rel=1e-12)
    # by hand: warm-up from 0 (step / warmup), then linear decay to 0 at the last step
    hand = [1e-4 * (s / warmup if s < warmup else (total - s) / (total - warmup)) for s in range(total)]
    assert got == pytest.approx(hand, rel=1e-12, abs=1e-20)
    if warmup:
        assert got[0] == 0.0  # HF's first step runs at lr 0


def test_constant_schedule_warms_up_from_zero():
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], {"lr": 1.0})
    got = _lrs(build_lr_schedule(opt, {"warmup_steps": 4, "schedule": "constant"}, 100), 7)
    assert got == pytest.approx([0, 0.25, 0.5, 0.75, 1, 1, 1])
    with pytest.raises(ValueError, match="cosine"):
        build_lr_schedule(opt, {"schedule": "cosine"}, 10)


@pytest.mark.parametrize("budget", ["paper", "cpu", "none"])
def test_sdpo_recipe_wins_over_budgets(budget, tmp_path):
    cfg = compose("train.yaml", ["experiment=books_sdpo", f"budget={budget}", "sdpo.sft_ckpt=/x/sft.ckpt"], tmp_path)
    assert cfg.optim.lr == pytest.approx(1e-5)
    assert cfg.trainer.max_epochs == 3
    assert cfg.sdpo.sft_ckpt == "/x/sft.ckpt"
    # the loss node holds the loss's hyperparameters only
    assert set(cfg.loss) == {"_target_", "beta", "num_negatives"}


def test_other_losses_keep_the_default_lr_and_epochs(tmp_path):
    cfg = compose("train.yaml", ["loss=sdpo"], tmp_path)
    assert cfg.optim.lr == pytest.approx(1e-4) and cfg.trainer.max_epochs == 10 and cfg.sdpo.sft_ckpt is None


def _lr_opt(lr: float = 1.0):
    return build_optimizer([torch.nn.Parameter(torch.zeros(1))], {"lr": lr})


@pytest.mark.parametrize("schedule", ["linear", "constant"])
@pytest.mark.parametrize("warmup,total,capped", [(20, 5, 0), (30, 30, 3), (50, 40, 4)])
def test_warmup_as_long_as_the_run_is_capped_with_a_warning(schedule, warmup, total, capped, caplog):
    """A warm-up >= the run's steps would keep the lr below optim.lr all run (e.g. 20 of 5: at most 0.2):
    it is capped to 10% of the run, with a warning naming both numbers."""
    with caplog.at_level("WARNING", logger="msl_rec.training.optim"):
        got = _lrs(build_lr_schedule(_lr_opt(), {"warmup_steps": warmup, "schedule": schedule}, total), total)
    decay = schedule == "linear"
    hand = [s / capped if s < capped else ((total - s) / (total - capped) if decay else 1.0) for s in range(total)]
    assert got == pytest.approx(hand, rel=1e-12, abs=1e-15)
    assert max(got) == 1.0  # the configured lr is reached
    assert f"optim.warmup_steps={warmup} >= the run's {total} optimizer steps" in caplog.text
    assert f"capped to {capped} steps" in caplog.text


def test_warmup_shorter_than_the_run_is_kept(caplog):
    with caplog.at_level("WARNING", logger="msl_rec.training.optim"):
        got = _lrs(build_lr_schedule(_lr_opt(), {"warmup_steps": 19, "schedule": "linear"}, 20), 20)
        unknown = _lrs(build_lr_schedule(_lr_opt(), {"warmup_steps": 50, "schedule": "linear"}, None), 3)
    assert got[:3] == pytest.approx([0, 1 / 19, 2 / 19]) and got[-1] == pytest.approx(1.0)
    assert unknown == pytest.approx([0, 1 / 50, 2 / 50])  # run length unknown: nothing to cap to
    assert "warmup_steps" not in caplog.text


def test_module_caps_the_warmup_of_a_constant_schedule_too(caplog):
    """configure_optimizers gives every schedule the run's length (it used to give it only to linear)."""
    backbone = OmegaConf.to_container(OmegaConf.load(f"{CONFIG_DIR}/backbone/tiny_llama.yaml"))
    module = RecLitModule(backbone=backbone, loss={"_target_": "msl_rec.losses.LMLLoss"},
                          optim={"lr": 1e-3, "warmup_steps": 20, "schedule": "constant"})
    module.configure_model()
    module._trainer = SimpleNamespace(estimated_stepping_batches=6)
    with caplog.at_level("WARNING", logger="msl_rec.training.optim"):
        sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert _lrs(sched, 6) == pytest.approx([1e-3] * 6)
    assert "optim.warmup_steps=20 >= the run's 6 optimizer steps" in caplog.text


BAD_OPTIM = [
    ({"lr": 0}, "optim.lr=0: must be > 0"),
    ({"lr": -1e-4}, "optim.lr=-0.0001: must be > 0"),
    ({"lr": "abc"}, "optim.lr='abc': must be a number"),
    ({"lr": float("inf")}, "optim.lr=inf: must be a finite number"),
    ({"weight_decay": -0.01}, "optim.weight_decay=-0.01: must be >= 0"),
    ({"betas": [0.9, 1.0]}, "optim.betas[1]=1.0: must be < 1"),
    ({"betas": [-0.1, 0.999]}, "optim.betas[0]=-0.1: must be >= 0"),
    ({"betas": 0.9}, "optim.betas=0.9: must be two numbers in [0, 1)"),
    ({"warmup_steps": -5}, "optim.warmup_steps=-5: must be >= 0"),
    ({"warmup_steps": 2.5}, "optim.warmup_steps=2.5: must be a whole number"),
]


@pytest.mark.parametrize("optim,says", BAD_OPTIM, ids=[s.split(":")[0] for _, s in BAD_OPTIM])
def test_bad_optim_setting_is_an_error_naming_the_key(optim, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], optim)
        build_lr_schedule(opt, optim, 10)
