"""RecLitModule pieces beside the steps: the lr schedule (HF's), the S-DPO recipe's composition."""

from __future__ import annotations

import pytest
import torch

from msl_rec.models.optim import build_lr_schedule, build_optimizer
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
