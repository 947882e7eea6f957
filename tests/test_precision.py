"""Training precision: bf16-mixed on CPU works (fp32 LoRA weights, losses close to fp32) and is the
automatic choice exactly when the CPU computes bf16 natively."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from msl_rec.train import train, trainer_precision
from msl_rec.utils import precision


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_follows_cpu_bf16_support(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: native)
    cpu = OmegaConf.create({"accelerator": "cpu", "precision": None})
    assert trainer_precision(cpu) == ("bf16-mixed" if native else "32-true")
    assert precision.auto_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
    # an explicit precision always wins: the one the automatic choice would NOT pick on this CPU (the old check
    # asked for 32-true, which a CPU without native bf16 picks anyway, so it held whatever the code did)
    explicit = "32-true" if native else "bf16-mixed"
    assert trainer_precision(OmegaConf.create({"accelerator": "cpu", "precision": explicit})) == explicit
    assert explicit != trainer_precision(cpu)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def test_cpu_bf16_check_agrees_with_the_cpu_flags_and_fails_safe(monkeypatch):
    """Against an independent source: oneDNN (hence torch) computes bf16 on x86 from AVX-512 core
    (avx512f/bw/dq/vl: AVX512-BF16 and AMX CPUs have it) up, which /proc/cpuinfo lists. A torch
    without oneDNN or without the check means no bf16."""
    import os
    import platform
    from types import SimpleNamespace

    flags = _cpu_flags()
    if platform.machine() != "x86_64" or not flags or "ONEDNN_MAX_CPU_ISA" in os.environ:
        pytest.skip("the flag rule is for x86-64 Linux with oneDNN's ISA unrestricted")
    precision.cpu_supports_bf16.cache_clear()
    try:
        assert precision.cpu_supports_bf16() == ({"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags)
        precision.cpu_supports_bf16.cache_clear()
        monkeypatch.setattr(torch.ops, "mkldnn", SimpleNamespace())  # a build without the op
        assert precision.cpu_supports_bf16() is False
        precision.cpu_supports_bf16.cache_clear()
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
        assert precision.cpu_supports_bf16() is False
    finally:
        monkeypatch.undo()
        precision.cpu_supports_bf16.cache_clear()


@pytest.mark.slow  # two fast_dev_runs with validation decoding (~50 s on 2 shared cores)
def test_bf16_mixed_on_cpu_trains_with_fp32_adapter_and_fp32_like_loss(compose_train, tmp_path):
    losses = {}
    for prec in ("32-true", "bf16-mixed"):
        cfg = compose_train("loss=msl", "debug=fdr", "logger=none", f"trainer.precision={prec}", out=tmp_path / prec)
        metrics, objects = train(cfg)
        assert objects["trainer"].precision == prec
        losses[prec] = metrics["train/loss_step"]
        lora = [p for n, p in objects["model"].named_parameters() if p.requires_grad]
        assert lora and all(p.dtype == torch.float32 for p in lora)  # master weights stay fp32
    assert math.isfinite(losses["bf16-mixed"])
    assert losses["bf16-mixed"] == pytest.approx(losses["32-true"], abs=5e-2)
    assert losses["bf16-mixed"] != losses["32-true"]  # autocast really ran in bf16
