"""Recommendation losses: one small module per loss over a shared :class:`ResponseBatch`.

``LMLLoss`` (language modelling, the BIGRec baseline), ``MSLLoss`` (masked softmax over the trie's
valid tokens), ``MSLATSLoss`` (MSL with adaptive temperature) and ``SDPOLoss`` (softmax DPO); the item-ID
sequential models' ``BCELoss``, ``CELoss`` and ``DROSLoss`` (:mod:`msl_rec.losses.sequential`) and
DLLM2Rec's distillation from an LLM teacher, ``DLLM2RecLoss`` (:mod:`msl_rec.losses.distill`).
The pure functions behind them are in :mod:`msl_rec.losses.functional`; :func:`build_loss` builds
one from its ``configs/loss`` node.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from msl_rec.losses.base import RecLoss, ResponseBatch
from msl_rec.losses.distill import DLLM2RecLoss
from msl_rec.losses.lml import LMLLoss
from msl_rec.losses.msl import MSLATSLoss, MSLLoss
from msl_rec.losses.sdpo import SDPOLoss
from msl_rec.losses.sequential import BCELoss, CELoss, DROSLoss
from msl_rec.utils.config import plain
from msl_rec.utils.registry import LOSSES, ConfigSecurityError, check_targets

__all__ = ["BCELoss", "CELoss", "DLLM2RecLoss", "DROSLoss", "LMLLoss", "MSLATSLoss", "MSLLoss", "RecLoss",
           "ResponseBatch", "SDPOLoss", "build_loss", "loss_settings"]


def loss_settings(loss_cfg: Mapping[str, Any], backbone_cfg: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A ``configs/loss`` node as plain data with the settings that depend on the backbone filled in:
    MSL+ATS's ``stats_at: null`` is the backbone's ``ats_stats_at`` (``root`` without one), the position
    whose valid set holds enough tokens for this tokenizer (configs/backbone/*.yaml)."""
    cfg = dict(plain(loss_cfg))
    if "stats_at" in cfg and cfg["stats_at"] is None:
        cfg["stats_at"] = (plain(backbone_cfg) or {}).get("ats_stats_at") or "root"
    return cfg


def build_loss(loss_cfg: Mapping[str, Any], backbone_cfg: Mapping[str, Any] | None = None) -> RecLoss:
    """The loss a ``configs/loss`` node names (``_target_`` + the loss's arguments), built by
    ``hydra.utils.instantiate`` after the target is checked against msl-rec's losses
    (:data:`~msl_rec.utils.registry.LOSSES`); settings resolved by :func:`loss_settings`."""
    cfg = loss_settings(loss_cfg, backbone_cfg)
    target = cfg.get("_target_")
    if target not in LOSSES:
        raise ConfigSecurityError(f"loss config: loss._target_={target!r} is not a msl-rec loss; choose one of "
                                  f"{sorted(LOSSES)} (configs/loss: {', '.join(LOSSES.values())})")
    check_targets(cfg, source="loss config", prefix="loss.")
    try:
        return instantiate(cfg, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        if isinstance(cause, ValueError):  # a setting out of range: the loss's own message names the key
            raise cause from None
        raise TypeError(f"loss config {target}: {cause} (a loss config holds only the loss's arguments; "
                        "S-DPO's sft_ckpt is sdpo.sft_ckpt, its lr optim.lr)") from e
