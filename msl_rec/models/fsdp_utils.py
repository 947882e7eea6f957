"""FSDP helpers: decoding on rank-local full weights, FSDP on CPU (tests).

Decoding under FSDP. Constrained beam search makes a data-dependent number of forward calls per
rank (beams die at different depths on different users), and every forward of an FSDP unit is an
all-gather, so ranks decoding different users fall out of step and hang. ``summon_full_params``
around the decoder does not help: FSDP forbids forward passes inside it, and Lightning runs
``validation_step`` inside the root FSDP forward. So each rank decodes with a plain, unsharded copy
of the backbone (:class:`DecodingCopy`): its weights are gathered once per validation, in
``on_validation_epoch_start`` (outside any forward, the same collectives on every rank), and the
decoder then runs without a single collective. The copy costs one full model per rank during
validation (16 GB in bf16 for LLaMA-3-8B, 0.3 GB for SmolLM2), built once and refreshed in place.

FSDP on CPU. Lightning 2.6 refuses ``FSDPStrategy`` on a CPU accelerator (an exact type check in
the accelerator connector; torch's FSDP1 itself runs on CPU with gloo) and, on CPU, saving a full
state dict with ``offload_to_cpu=True`` frees storage that is still in use (Lightning issue #21804,
a segfault). :class:`CPUFSDPStrategy` lifts the check and gathers full state dicts without the
offload; ``trainer=fsdp_sim`` uses it so the FSDP paths run in the CPU test suite.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp import (
    FullOptimStateDictConfig,
    FullStateDictConfig,
    OptimStateKeyType,
    StateDictType,
)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from msl_rec.models.checkpoint import canonical_key

log = logging.getLogger(__name__)


def is_fsdp(module: nn.Module | None) -> bool:
    """Whether ``module`` holds FSDP units (torch's FSDP1 ``FullyShardedDataParallel``, what
    Lightning's ``FSDPStrategy`` wraps with; its FSDP2 ``ModelParallelStrategy`` is not used here)."""
    if module is None:
        return False
    return any(isinstance(m, FSDP) for m in module.modules())


class DecodingCopy:
    """A rank-local, unsharded copy of an FSDP-wrapped backbone, for decoding.

    ``build`` makes a fresh backbone with the same architecture (any weights); :meth:`refresh`
    copies every parameter and buffer of the sharded model into it, matched by canonical name
    (a missing or extra name is an error, never a silently different model).
    """

    def __init__(self, build: Callable[[], nn.Module]):
        self._build = build
        self.model: nn.Module | None = None

    def refresh(self, root: nn.Module, sharded: nn.Module) -> nn.Module:
        """Gather ``sharded`` (a submodule of the FSDP ``root``) into the copy; a collective: call it
        on every rank, outside any forward pass."""
        ctx = (FSDP.summon_full_params(root, writeback=False, recurse=True)
               if isinstance(root, FSDP) else contextlib.nullcontext())
        with ctx, torch.no_grad():
            src = {canonical_key(n): t for n, t in _tensors(sharded)}
            if self.model is None:
                device = next(iter(src.values())).device
                self.model = self._build().to(device)
                self.model.requires_grad_(False)
            dst = dict(_tensors(self.model))
            missing, extra = sorted(set(dst) - set(src)), sorted(set(src) - set(dst))
            if missing or extra:
                raise RuntimeError(f"FSDP decoding copy: parameter names differ from the sharded model "
                                   f"(missing {missing[:5]}, unexpected {extra[:5]})")
            for name, t in dst.items():
                s = src[name]
                if s.shape != t.shape:
                    raise RuntimeError(f"FSDP decoding copy: {name} has shape {tuple(s.shape)} in the sharded "
                                       f"model but {tuple(t.shape)} in the copy (summon_full_params did not "
                                       "unshard it; use_orig_params must be true)")
                t.copy_(s)
        self.model.eval()
        return self.model


def _tensors(module: nn.Module):
    yield from module.named_parameters(remove_duplicate=True)
    yield from module.named_buffers(remove_duplicate=True)


class AdapterFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` that does not gather the full model for a checkpoint: the module's
    ``on_save_checkpoint`` writes the adapter and loss state (:func:`~msl_rec.models.checkpoint.
    adapter_state_dict`, which unshards only the units holding trainable parameters), so the full
    state dict Lightning would gather first (16 GB for LLaMA-3-8B, to keep 3.4 M parameters) is
    skipped. Resuming a run under FSDP is not covered by a test yet."""

    strategy_name = "fsdp_adapter"

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return {}  # replaced by RecLitModule.on_save_checkpoint on every rank


class CPUFSDPStrategy(AdapterFSDPStrategy):
    """Lightning's ``FSDPStrategy`` allowed on a CPU accelerator (gloo), for tests: full state dicts
    are gathered without ``offload_to_cpu`` there (Lightning #21804). On GPUs use ``FSDPStrategy``."""

    strategy_name = "fsdp_cpu_sim"

    def _setup_model(self, model: nn.Module) -> nn.Module:
        # torch's FSDP takes CPU only from an explicit device_id; Lightning passes root_device.index
        # (None on CPU). Wrap here as Lightning does, then let it finish (activation checkpointing ...).
        if self.root_device.type == "cpu" and not is_fsdp(model):
            kwargs = dict(self.kwargs)
            model = FSDP(module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                         sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **kwargs)
            self.kwargs.pop("auto_wrap_policy", None)  # applied above; Lightning warns if it is still set
        return super()._setup_model(model)

    def _full_state_dict_context(self):
        offload = self.root_device.type != "cpu"
        return FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT,
                                    FullStateDictConfig(offload_to_cpu=offload, rank0_only=True),
                                    FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=True))

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        if self._state_dict_type != "full" or self.root_device.type != "cpu":
            return super().optimizer_state(optimizer)
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        with self._full_state_dict_context():
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state
