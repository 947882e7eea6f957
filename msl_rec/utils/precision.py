"""Floating-point types: the fast one for training, and the fixed one metrics are computed in.

Training may run in bf16 where the device computes it natively (:func:`auto_dtype`, used by
``trainer.precision=null``). Evaluation does not follow the machine: decoding and scoring run in
float32 unless a config asks for bfloat16 by name (``decoder.dtype=bfloat16``), so a metric or a
ranking never depends on which CPU or GPU computed it. :func:`autocast_off` keeps an active autocast
(Lightning's ``bf16-mixed`` wraps validation in one) from turning those float32 matmuls into bf16
ones; :class:`msl_rec.models.inference.ModelCopies` holds the model in the dtype asked for.
"""

from __future__ import annotations

import contextlib
import functools

import torch

EVAL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@functools.cache
def cpu_supports_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls on this CPU with its bf16 kernels (x86: AVX-512 core and up,
    which AVX512-BF16 / AMX CPUs such as AMD Zen 4 and Intel SPR have).

    The check oneDNN itself uses (``torch.ops.mkldnn._is_mkldnn_bf16_supported``). Without it
    (e.g. an AVX2-only CPU) torch emulates bf16 and a SmolLM2 matmul runs ~50x slower than in fp32,
    so training's automatic choice must not pick bf16 there.
    """
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the op: assume no
        return False


def auto_dtype(device: torch.device | str) -> torch.dtype:
    """Training's automatic choice: bf16 on a GPU that supports it or on a CPU with native bf16, else
    fp32. Never used for evaluation (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    return torch.float32


def eval_dtype(name: str, key: str = "decoder.dtype") -> torch.dtype:
    """The torch dtype an evaluation config names (``float32`` or ``bfloat16``); anything else,
    ``auto`` included, is an error naming ``key``."""
    if name == "auto":
        raise ValueError(f"{key}=auto is no longer accepted: it meant bf16 on machines with native bf16 and "
                         "float32 elsewhere, so metrics depended on the machine. Set "
                         f"{key}=float32 (the default: the same numbers everywhere) or {key}=bfloat16 "
                         "(faster where bf16 is native, rankings may differ slightly)")
    if name not in EVAL_DTYPES:
        raise ValueError(f"{key} must be one of {sorted(EVAL_DTYPES)}, got {name!r}")
    return EVAL_DTYPES[name]


def autocast_off(device: torch.device | str):
    """A context in which an enclosing ``torch.autocast`` on ``device``'s type is disabled, so tensors
    are computed in their own dtype (float32 weights -> float32 matmuls)."""
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda", "xpu", "mps", "hpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def weights_version(model: torch.nn.Module) -> tuple:
    """Changes whenever the model's function may have changed: a parameter replaced or updated in
    place (optimiser step, ``load_state_dict``: torch bumps the tensor's version counter), a peft
    adapter switched on/off, train/eval mode."""
    adapters = tuple(bool(m.disable_adapters) for m in model.modules() if hasattr(m, "disable_adapters"))
    return (id(model), model.training, adapters, tuple((id(p), p._version) for p in model.parameters()))
