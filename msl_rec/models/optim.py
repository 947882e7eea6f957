"""Optimiser and learning-rate schedule of a RecLitModule (``optim`` config node).

AdamW over the trainable (LoRA) parameters; the schedule is transformers' own, as the HF Trainer
the paper used: linear warm-up from 0 over ``warmup_steps`` optimiser steps (factor
``step / warmup_steps``, so the first step runs at lr 0), then ``linear`` decay to 0 at the last
step (``get_linear_schedule_with_warmup``) or ``constant`` (``get_constant_schedule_with_warmup``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

SCHEDULES = ("linear", "constant")


def build_optimizer(params: Iterable[torch.nn.Parameter], optim: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW with ``lr`` (1e-4), ``weight_decay`` (0) and ``betas`` ((0.9, 0.999))."""
    return torch.optim.AdamW(list(params), lr=float(optim.get("lr", 1e-4)),
                             weight_decay=float(optim.get("weight_decay", 0.0)),
                             betas=tuple(optim.get("betas", (0.9, 0.999))))


def build_lr_schedule(optimizer: torch.optim.Optimizer, optim: Mapping[str, Any],
                      total_steps: int | None) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimiser-step schedule. ``total_steps`` None (unknown): ``linear`` decays nowhere and
    behaves as ``constant`` after the warm-up."""
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    schedule = optim.get("schedule", "linear")
    if schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule: {schedule!r} ({', '.join(SCHEDULES)})")
    warmup = int(optim.get("warmup_steps", 20))
    if schedule == "linear" and total_steps is not None:
        return get_linear_schedule_with_warmup(optimizer, warmup, int(total_steps))
    return get_constant_schedule_with_warmup(optimizer, warmup)
