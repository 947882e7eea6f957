"""What a RecLitModule checkpoint holds besides Lightning's trainer state, and how it is read.

- **Adapter state**: the trainable (LoRA) parameters (and a hybrid method's slot parts, frozen or not) and the
  loss's parameters and buffers (e.g.
  MSL-ATS's EMA of tau), under *canonical* names (:func:`canonical_key`): ``model.<peft name>`` and
  ``loss.<name>``, the same with no strategy, DDP and FSDP. It is built from the trainable
  parameters themselves (:func:`adapter_state_dict`), never by filtering a full state dict, so the
  frozen base is never gathered into a checkpoint. Loading (:func:`load_adapter_state_dict`)
  requires exactly the expected keys and names the missing and unexpected ones otherwise.
- **Backbone record** (``checkpoint["adapter"]``): the backbone name and the adapter's shapes, so
  evaluating with another backbone is an error naming both (:func:`check_checkpoint_backbone`).
- **RNG state of every rank** (``checkpoint["rng_states"]``, a list indexed by rank): each rank
  restores its own on resume.

Every file is read with ``torch.load(weights_only=True)`` (:func:`read_checkpoint`), so what is
saved here is tensors and plain Python data only.

Why not the libraries' helpers (issue 20, checked against peft 0.21 and torch 2.13):
``torch.distributed.checkpoint.state_dict.get_model_state_dict(..., full_state_dict=True,
ignore_frozen_params=True)`` gives the same canonical names but, under FSDP1, gathers the full
state dict (the frozen base included: 16 GB for LLaMA-3-8B) and drops the frozen tensors after;
peft's ``get_peft_model_state_dict`` filters ``model.state_dict()`` (the same gather), drops the
adapter name from the keys (the committed adapters hold ``lora_A.default.weight``, which its
``set_peft_model_state_dict`` would load as ``lora_A.default.default.weight``) and knows nothing
of the loss's buffers; both load with ``strict=False``, so the named key and shape errors below
would stay hand code anyway.
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from msl_rec.models.hybrid import KEEP_ATTR


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used as asked (unreadable, unsafe, wrong keys or backbone)."""


# path components that wrappers insert into parameter names: FSDP, activation checkpointing,
# torch.compile anywhere; DDP / DataParallel only in front
WRAPPER_COMPONENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
LEADING_WRAPPER_COMPONENTS = frozenset({"module"})


def canonical_key(name: str) -> str:
    """A parameter name without the components wrappers add (``_fsdp_wrapped_module.``,
    ``_checkpoint_wrapped_module.``, ``_orig_mod.`` anywhere, a leading ``module.``).

    ``model._fsdp_wrapped_module.base_model.model.model.layers.0._fsdp_wrapped_module.self_attn.q_proj.lora_A.default.weight``
    -> ``model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``.
    """
    parts = name.split(".")
    while parts and parts[0] in LEADING_WRAPPER_COMPONENTS:
        parts = parts[1:]
    return ".".join(p for p in parts if p not in WRAPPER_COMPONENTS)


# ---------------------------------------------------------------------------- reading files
def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that name the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses anything but tensors and plain data: a file that would construct
        # other objects (or run code) stops here, before anything in it runs
        raise CheckpointError(
            f"checkpoint {path}: refused by torch.load(weights_only=True): it holds objects other than "
            f"tensors and plain data, or is not a torch checkpoint at all. Only load checkpoints written "
            f"by msl-rec-train. ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    except Exception as e:  # garbage makes the unpickler fail in many ways (KeyError, IndexError, EOFError ...)
        raise CheckpointError(f"checkpoint {path}: not a torch checkpoint file (torch.load failed: "
                              f"{type(e).__name__}: {e}); pass a .ckpt written by msl-rec-train") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"checkpoint {path}: no 'state_dict' in it; pass a .ckpt written by msl-rec-train")
    return ckpt


# ---------------------------------------------------------------------------- adapter state
def _full(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter, whatever the sharding (DTensor: FSDP2 / tensor parallel)."""
    if hasattr(p, "full_tensor"):
        p = p.full_tensor()
    return p.detach().to("cpu", copy=True)


def saved_parameter(p: torch.Tensor) -> bool:
    """Whether a checkpoint holds ``p``: trainable, or a method's frozen state (a hybrid method's slot parts,
    :data:`~msl_rec.models.hybrid.KEEP_ATTR`)."""
    return p.requires_grad or bool(getattr(p, KEEP_ATTR, False))


def _trainable(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Canonical name -> full CPU tensor of every trainable parameter of ``model``.

    Under FSDP1 (``use_orig_params=True``) a parameter outside forward is a view of this rank's
    shard; each FSDP unit that owns trainable parameters is unsharded on its own
    (``summon_full_params(recurse=False)``: one layer at a time, as in forward), so the frozen base
    is never gathered as a whole. Collective under FSDP: call it on every rank.
    """
    out: dict[str, torch.Tensor] = {}
    units = FSDP.fsdp_modules(model)
    if not units:
        for name, p in model.named_parameters():
            if saved_parameter(p):
                out[canonical_key(prefix + name)] = _full(p)
        return out
    owner = {}  # parameter id -> its innermost FSDP unit
    for unit in units:
        for p in unit.parameters():
            owner[id(p)] = unit
    names = {id(p): n for n, p in model.named_parameters()}
    for unit in units:
        mine = [p for p in unit.parameters() if saved_parameter(p) and owner[id(p)] is unit]
        if not mine:
            continue
        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            for p in unit.parameters():
                if saved_parameter(p) and owner[id(p)] is unit:
                    out[canonical_key(prefix + names[id(p)])] = p.detach().to("cpu", copy=True)
    return out


def adapter_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint's ``state_dict``: ``model.<trainable parameter>`` and ``loss.<param/buffer>``
    under canonical names, full tensors on the CPU. ``module`` has ``.model`` and ``.loss``."""
    state = _trainable(module.model, "model.")
    for name, t in list(module.loss.named_parameters()) + list(module.loss.named_buffers()):
        state[canonical_key("loss." + name)] = _full(t)
    return state


def load_adapter_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy a saved adapter state into ``module`` (built, not wrapped). Keys are compared after
    :func:`canonical_key`; a missing, unexpected or misshapen key is a :class:`CheckpointError`."""
    state = {canonical_key(k): v for k, v in state.items()}
    targets = {canonical_key("model." + n): p for n, p in module.model.named_parameters() if saved_parameter(p)}
    targets.update({canonical_key("loss." + n): t for n, t in
                    list(module.loss.named_parameters()) + list(module.loss.named_buffers())})
    missing = sorted(set(targets) - set(state))
    unexpected = sorted(set(state) - set(targets))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: adapter keys do not match the model ({len(missing)} missing, {len(unexpected)} unexpected; "
            f"missing e.g. {missing[:3]}, unexpected e.g. {unexpected[:3]}). Was it trained with another "
            f"backbone, LoRA setting or loss?")
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(t.shape)}" for k, t in targets.items()
             if tuple(state[k].shape) != tuple(t.shape)]
    if wrong:
        raise CheckpointError(f"{source}: adapter shapes do not match the model (saved vs model): {wrong[:3]}")
    with torch.no_grad():
        for k, t in targets.items():
            t.copy_(state[k].to(device=t.device, dtype=t.dtype))


SFT_LOSS = "LMLLoss"  # S-DPO starts from a model fine-tuned with the language-modelling loss


def sft_adapter(path: str | Path, backbone_cfg: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The LoRA weights of an SFT checkpoint with peft key names (``base_model....``), to merge
    into the base before S-DPO.

    Refused with a :class:`CheckpointError` naming the file: a file with no LoRA weights (never a
    silent no-op); a checkpoint of a run trained with any loss but LML (its
    ``hyper_parameters.loss._target_``: S-DPO's reference is the SFT model); and, given the
    configured ``backbone_cfg``, one of another backbone or whose LoRA rank or alpha differ from
    ``backbone.lora`` (the adapter is merged with the configured settings, so another r cannot load
    and another alpha would silently rescale the merged update by ``alpha / r``).
    """
    ckpt = read_checkpoint(path)
    state = ckpt["state_dict"]
    lora = {canonical_key(k)[len("model."):]: v for k, v in state.items()
            if canonical_key(k).startswith("model.") and "lora_" in k}
    if not lora:
        raise CheckpointError(f"SFT checkpoint {path}: no LoRA weights in its state_dict ({len(state)} keys, "
                              f"e.g. {sorted(state)[:3]}); pass a checkpoint of an LML (SFT) run")
    hparams = ckpt.get("hyper_parameters") or {}
    loss = (hparams.get("loss") or {}).get("_target_")
    if not isinstance(loss, str) or loss.rsplit(".", 1)[-1] != SFT_LOSS:
        trained = f"was trained with loss {loss}" if loss else "holds no record of its loss (hyper_parameters.loss)"
        raise CheckpointError(f"SFT checkpoint {path} {trained}, not {SFT_LOSS}: S-DPO starts from an LML (SFT) "
                              f"run; pass a checkpoint of `msl-rec-train experiment=books_lml` (or loss=lml) "
                              f"as sdpo.sft_ckpt")
    if backbone_cfg is not None:
        _check_sft_lora(path, ckpt, lora, backbone_cfg)
    return lora


def _check_sft_lora(path: str | Path, ckpt: Mapping[str, Any], lora: Mapping[str, torch.Tensor],
                    backbone_cfg: Mapping[str, Any]) -> None:
    """The SFT checkpoint's backbone, LoRA rank (from its ``lora_A`` shapes, (r, in)) and alpha (from
    its hyper_parameters, when recorded) against the configured ``backbone_cfg``."""
    saved_backbone = (ckpt.get("hyper_parameters") or {}).get("backbone") or {}
    saved_name = (ckpt.get("adapter") or {}).get("backbone", saved_backbone.get("name"))
    if saved_name is not None and saved_name != backbone_cfg.get("name"):
        raise CheckpointError(f"SFT checkpoint {path} was trained with backbone {saved_name!r} but the config "
                              f"names {backbone_cfg.get('name')!r}; run S-DPO with backbone={saved_name}")
    want = dict(backbone_cfg.get("lora") or {})
    want_r, want_alpha = int(want.get("r", 8)), want.get("alpha", 16)  # backbone.lora_config's defaults
    ranks = sorted({int(v.shape[0]) for k, v in lora.items() if "lora_A" in k and v.dim() == 2})
    if ranks and ranks != [want_r]:
        raise CheckpointError(f"SFT checkpoint {path}: its LoRA adapter has r={', '.join(map(str, ranks))} but "
                              f"backbone.lora.r={want_r} is configured; the SFT adapter is merged with the configured "
                              f"LoRA settings, so set backbone.lora.r={ranks[0]} (as in its run)")
    saved_alpha = (saved_backbone.get("lora") or {}).get("alpha")
    if saved_alpha is not None and float(saved_alpha) != float(want_alpha):
        raise CheckpointError(f"SFT checkpoint {path}: its run used backbone.lora.alpha={saved_alpha} but "
                              f"backbone.lora.alpha={want_alpha} is configured; merging with it would scale the SFT "
                              f"update by {want_alpha}/r instead of {saved_alpha}/r, so set "
                              f"backbone.lora.alpha={saved_alpha}")


# ---------------------------------------------------------------------------- backbone record
def backbone_record(backbone_cfg: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``checkpoint["adapter"]``: the backbone name, its LoRA settings and the shapes of the saved
    adapter ``state``."""
    lora = dict(backbone_cfg.get("lora") or {})
    return {"backbone": backbone_cfg.get("name"), "lora_r": lora.get("r"),
            "target_modules": list(lora.get("target_modules") or []),
            "shapes": {k: list(v.shape) for k, v in state.items()}}


def check_checkpoint_backbone(ckpt: str | Path | Mapping[str, Any], backbone_cfg: Mapping[str, Any]) -> None:
    """Raise :class:`CheckpointError` naming both when ``ckpt`` (a path or a loaded checkpoint)
    was trained with another backbone than ``backbone_cfg`` names."""
    where = str(ckpt) if isinstance(ckpt, (str, Path)) else "checkpoint"
    if isinstance(ckpt, (str, Path)):
        ckpt = read_checkpoint(ckpt)
    saved = (ckpt.get("adapter") or {}).get("backbone")
    if saved is None:
        saved = ((ckpt.get("hyper_parameters") or {}).get("backbone") or {}).get("name")
    want = backbone_cfg.get("name")
    if saved != want:
        raise CheckpointError(f"{where} was trained with backbone {saved!r} but the config names {want!r}; "
                              f"evaluate it with backbone={saved} (or run_dir=<its run folder>)")


# ---------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain data (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys).astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, indexed by rank (collective when a process group is up)."""
    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def rank_rng_state(states: Any, rank: int, world_size: int) -> dict[str, Any] | None:
    """The RNG state saved by ``rank`` (a checkpoint from an older version holds one dict)."""
    if not states:
        return None
    if isinstance(states, Mapping):  # one state for every rank (saved before per-rank states)
        return dict(states)
    if len(states) != world_size:
        raise CheckpointError(f"the checkpoint holds RNG states of {len(states)} ranks but this run has "
                              f"{world_size}; resume with the same number of processes")
    return states[rank]
