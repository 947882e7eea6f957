"""Which floating-point type this machine computes fastest in: one check shared by training and decoding."""

from __future__ import annotations

import functools

import torch


@functools.cache
def cpu_supports_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 / AMX; e.g. AMD Zen 4, Intel SPR).

    The check oneDNN itself uses (``torch.ops.mkldnn._is_mkldnn_bf16_supported``). Without native
    support (e.g. an AVX2-only CPU) torch emulates bf16 and a SmolLM2 matmul runs ~50x slower than
    in fp32, so the automatic choice must not pick bf16 there.
    """
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without the op: assume no
        return False


def auto_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on a GPU that supports it or on a CPU with native bf16, else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    return torch.float32
