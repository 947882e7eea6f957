"""A char-level tokenizer, a tiny catalog over it and a tiny random Llama, for decoding tests."""

from __future__ import annotations

import pytest
import torch

from msl_rec.data.catalog import ItemCatalog

ALPHABET = ' "abcdefghijklmnopqrstuvwxyz'


class CharTokenizer:
    """One token per character; 0 = pad, 1 = EOS, then the alphabet."""

    pad_token_id = 0
    eos_token_id = 1

    def __init__(self):
        self.vocab = {c: i + 2 for i, c in enumerate(ALPHABET)}
        self.vocab_size = len(ALPHABET) + 2

    def encode(self, text: str) -> list[int]:
        return [self.vocab[c] for c in text]

    def __call__(self, texts, add_special_tokens: bool = False):
        return {"input_ids": [self.encode(t) for t in texts]}


# shared prefixes, one title a prefix of another ("the cat" / "the cat sat"), and duplicates
TITLES = [
    "the cat", "the cat sat", "the cab", "the dog", "the dot", "a dog", "a day", "a day out",
    "dune", "dunes", "dust", "emma", "ember", "embers", "go", "gone", "good", "goods", "hat",
    "hats", "ice", "iced", "it", "the cab", "dune", "jo", "joy", "joke", "kite", "kit",
]


@pytest.fixture(scope="session")
def tokenizer():
    return CharTokenizer()


@pytest.fixture(scope="session")
def catalog(tokenizer):
    return ItemCatalog({100 + i: t for i, t in enumerate(TITLES)}, tokenizer)


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peaked, well-separated next-token distributions (no near-ties)
        model.lm_head.weight.mul_(40.0)
    return model


def make_batch(tokenizer, prompts: list[str], targets: list[int] | None = None) -> dict:
    """Left-padded prompt batch in the data module's layout."""
    enc = [tokenizer.encode(p) for p in prompts]
    width = max(map(len, enc))
    ids = torch.tensor([[0] * (width - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
    n = len(prompts)
    return {"prompt_input_ids": ids, "prompt_attention_mask": mask,
            "target_ids": torch.tensor(targets if targets is not None else [100] * n),
            "user_ids": torch.arange(n)}


@pytest.fixture
def make_batch_fn(tokenizer):
    return lambda prompts, targets=None: make_batch(tokenizer, prompts, targets)


def rank(decoder, model, batch: dict, inference=None) -> list:
    """``decoder``'s rankings of ``batch`` with ``model``, through the inference layer configured as the
    evaluation configures it (``decoder.dtype`` / ``shared_prompt`` / ``share_preamble``); pass
    ``inference`` to keep its state (model copy, preamble KV) across calls."""
    from msl_rec.models.inference import CausalLMInference

    if inference is None:
        inference = CausalLMInference(decoder.dtype, decoder.shared_prompt, decoder.share_preamble)
    return decoder.rank(inference.bind(model), batch)
