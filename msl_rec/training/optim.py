"""Optimiser and learning-rate schedule of a RecLitModule (``optim`` config node).

The optimizer is the ``optim`` node's ``_target_`` (``torch.optim.AdamW``, allowlisted) built by
``hydra.utils.instantiate`` as a partial over the trainable (LoRA) parameters; the schedule keys
(:data:`SCHEDULE_KEYS`) sit beside its arguments. The schedule is transformers' own, as the HF Trainer
the paper used: linear warm-up from 0 over ``warmup_steps`` optimiser steps (factor
``step / warmup_steps``, so the first step runs at lr 0), then ``linear`` decay to 0 at the last
step (``get_linear_schedule_with_warmup``) or ``constant`` (``get_constant_schedule_with_warmup``).

Types are the schema's (msl_rec/utils/schema.py ``OptimConfig``, checked at compose); the values a
type cannot express are checked when the optimiser is built (:func:`optim_settings`), each error
naming its ``optim.`` key; a warm-up as long as the run or longer is capped (:func:`capped_warmup`).
A checkpoint saved before ``optim`` had a ``_target_`` builds AdamW.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from msl_rec.losses.base import checked_number
from msl_rec.utils.config import plain
from msl_rec.utils.registry import check_targets

log = logging.getLogger(__name__)

SCHEDULES = ("linear", "constant")
DEFAULT_OPTIMIZER = "torch.optim.AdamW"
SCHEDULE_KEYS = ("warmup_steps", "schedule", "global_batch_size")
"""``optim`` keys that are not the optimizer's arguments (the schedule, and the batch the trainer accumulates)."""
# share of the run's optimiser steps a too-long warm-up is capped to: the warm-up ratio HF recipes commonly use
WARMUP_CAP_FRACTION = 0.1


def optim_settings(optim: Mapping[str, Any]) -> dict[str, Any]:
    """The ``optim`` node's settings with defaults, value-checked; errors name the key.

    ``lr`` (1e-4) > 0, ``weight_decay`` (0) >= 0, ``betas`` ((0.9, 0.999)) two numbers in [0, 1),
    ``warmup_steps`` (20) a whole number >= 0, ``schedule`` (linear) one of :data:`SCHEDULES`.
    An lr <= 0 trains nothing (or climbs the loss), a negative weight decay grows the weights.
    """
    schedule = optim.get("schedule", "linear")
    if schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule: {schedule!r} ({', '.join(SCHEDULES)})")
    given = optim.get("betas", (0.9, 0.999))
    betas = list(given) if isinstance(given, Iterable) and not isinstance(given, (str, bytes)) else []
    if len(betas) != 2:
        raise ValueError(f"optim.betas={given!r}: must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    return {"lr": checked_number("optim.lr", optim.get("lr", 1e-4), above=0),
            "weight_decay": checked_number("optim.weight_decay", optim.get("weight_decay", 0.0), at_least=0),
            "betas": tuple(checked_number(f"optim.betas[{i}]", b, at_least=0, below=1) for i, b in enumerate(betas)),
            "warmup_steps": checked_number("optim.warmup_steps", optim.get("warmup_steps", 20), at_least=0,
                                           integer=True),
            "schedule": schedule}


def build_optimizer(params: Iterable[torch.nn.Parameter], optim: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimizer ``optim`` names (``_target_``, default AdamW) over ``params``: its arguments
    (every key but ``_target_``, ``_partial_`` and :data:`SCHEDULE_KEYS`) with ``lr``, ``weight_decay``
    and ``betas`` checked by :func:`optim_settings`, built as a partial by ``hydra.utils.instantiate``
    after the target is checked against the allowlist."""
    optim = dict(plain(optim))
    s = optim_settings(optim)
    node = {k: v for k, v in optim.items() if k not in SCHEDULE_KEYS and k not in ("_target_", "_partial_")}
    node.update(_target_=optim.get("_target_") or DEFAULT_OPTIMIZER, _partial_=True, lr=s["lr"],
                weight_decay=s["weight_decay"], betas=s["betas"])
    check_targets(node, source="optim config", prefix="optim.")
    make = instantiate(node, _convert_="all")
    return make(list(params))


def capped_warmup(warmup_steps: int, total_steps: int | None) -> int:
    """``warmup_steps``, or ``int(WARMUP_CAP_FRACTION * total_steps)`` with a warning when the warm-up
    would last the whole run (``warmup_steps >= total_steps``).

    Such a warm-up never reaches the configured lr: the last step runs at ``lr * (total - 1) /
    warmup`` (1/20 of it for a 2-step debug run under the default 20 steps, and the first step at 0),
    so the run trains at a fraction of the lr it was asked for without a word. Capping to the last step
    (``total - 1``) would reach the lr only at the last step, a run that is all warm-up; 10% of the
    run (HF's usual warm-up ratio) keeps a warm-up and trains most steps near the configured lr.
    Runs of fewer than 10 steps get no warm-up. ``total_steps`` None (unknown): no cap.
    """
    if total_steps is None or warmup_steps == 0 or warmup_steps < total_steps:
        return warmup_steps
    capped = int(WARMUP_CAP_FRACTION * total_steps)
    log.warning("optim.warmup_steps=%d >= the run's %d optimizer steps: the lr would never reach optim.lr; "
                "warm-up capped to %d steps (%d%% of the run). Set optim.warmup_steps below %d to choose it.",
                warmup_steps, total_steps, capped, round(100 * WARMUP_CAP_FRACTION), total_steps)
    return capped


def build_lr_schedule(optimizer: torch.optim.Optimizer, optim: Mapping[str, Any],
                      total_steps: int | None) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimiser-step schedule over a run of ``total_steps`` optimiser steps, the warm-up capped
    by :func:`capped_warmup`. ``total_steps`` None (unknown): ``linear`` decays nowhere and behaves
    as ``constant`` after the warm-up."""
    s = optim_settings(optim)
    warmup = capped_warmup(s["warmup_steps"], total_steps)
    if s["schedule"] == "linear" and total_steps is not None:
        return get_linear_schedule_with_warmup(optimizer, warmup, int(total_steps))
    return get_constant_schedule_with_warmup(optimizer, warmup)
