"""Loss settings are checked at construction, with errors naming the ``loss.`` key (issue 19 §3.12)."""

from __future__ import annotations

import math
import re

import pytest
from hydra.errors import ConfigCompositionException

from msl_rec.losses import LMLLoss, MSLATSLoss, MSLLoss, SDPOLoss

BAD = [  # (loss class, keyword, value, what the message says)
    (LMLLoss, "tau", 0, "must be > 0"),
    (LMLLoss, "tau", -1.0, "must be > 0"),
    (LMLLoss, "tau", "abc", "must be a number"),
    (LMLLoss, "tau", float("nan"), "must be a finite number"),
    (LMLLoss, "tau", True, "must be a number"),
    (MSLLoss, "tau", 0.0, "must be > 0"),
    (MSLLoss, "tau", "abc", "must be a number"),
    (MSLLoss, "alpha_mode", "false", "must be true or false"),
    (MSLLoss, "log_invalid_mass", 1, "must be true or false"),
    (MSLATSLoss, "tau_min", 0, "must be > 0"),
    (MSLATSLoss, "tau_max", -2.0, "must be > 0"),
    (MSLATSLoss, "warmup_tau", 0, "must be > 0"),
    (MSLATSLoss, "eta", 0, "must be > 0"),
    (MSLATSLoss, "ema", 0, "must be > 0"),
    (MSLATSLoss, "ema", 1.5, "must be <= 1"),
    (MSLATSLoss, "ema_init", 0, "must be > 0"),
    (MSLATSLoss, "warmup_steps", -1, "must be >= 0"),
    (MSLATSLoss, "warmup_steps", 2.5, "must be a whole number"),
    (MSLATSLoss, "root", "both", "must be one of plus, minus"),
    (MSLATSLoss, "stats_at", "last", "must be one of root, widest"),
    (SDPOLoss, "beta", 0, "must be > 0"),
    (SDPOLoss, "beta", -1.0, "must be > 0"),
    (SDPOLoss, "num_negatives", 0, "must be >= 1"),
    (SDPOLoss, "num_negatives", 1.5, "must be a whole number"),
    (SDPOLoss, "num_negatives", "abc", "must be a whole number"),
]


@pytest.mark.parametrize("cls,key,value,says", BAD, ids=[f"{c.__name__}-{k}={v!r}" for c, k, v, _ in BAD])
def test_bad_setting_is_an_error_naming_the_key(cls, key, value, says):
    with pytest.raises(ValueError, match=re.escape(f"loss.{key}={value!r}: {says}")):
        cls(**{key: value})


def test_ats_empty_clamp_range_names_both_keys():
    with pytest.raises(ValueError, match=r"loss.tau_min=3.0 > loss.tau_max=2.0"):
        MSLATSLoss(tau_min=3.0, tau_max=2.0)


def test_good_settings_are_kept_as_numbers():
    assert LMLLoss(tau="1.5").tau == 1.5  # a numeric string is a number
    ats = MSLATSLoss(warmup_steps=3.0, ema_init=None, tau_min=1, tau_max=1)
    assert ats.warmup_steps == 3 and isinstance(ats.warmup_steps, int) and math.isnan(float(ats.tau_ema))
    assert SDPOLoss(num_negatives=2.0).num_negatives == 2


def test_non_numeric_tau_from_the_command_line(compose_train):
    """``msl-rec-train loss=msl loss.tau=abc`` fails when the config is composed (the loss schema types
    tau as a float), naming the key."""
    with pytest.raises(ConfigCompositionException) as err:
        compose_train("loss=msl", "loss.tau=abc")
    assert "loss.tau" in f"{err.value} {err.value.__cause__}"


def test_out_of_range_tau_from_the_command_line_names_the_key(compose_train):
    """What a type cannot express (tau > 0) is the loss's own check, when the run builds it."""
    from msl_rec.train import train

    with pytest.raises(ValueError, match=re.escape("loss.tau=-1.0: must be > 0")):
        train(compose_train("loss=msl", "loss.tau=-1"))
