"""A tiny character-level tokenizer for synthetic catalogs (one token per character)."""

from __future__ import annotations


class CharTokenizer:
    """``ord(c)`` per character; EOS 0, optional BOS 1 added with the special tokens; no pad token."""

    eos_token_id = 0
    pad_token_id = None

    def __init__(self, bos: bool = False):
        self.bos = bos

    def encode_one(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if self.bos and add_special_tokens else []) + [ord(c) for c in text]

    def __call__(self, texts, add_special_tokens: bool = True):
        if isinstance(texts, str):
            return {"input_ids": self.encode_one(texts, add_special_tokens)}
        return {"input_ids": [self.encode_one(t, add_special_tokens) for t in texts]}


def brute_force_trie(sequences) -> dict:
    """Nested dicts token -> subtree, built from the sequences directly."""
    root: dict = {}
    for seq in sequences:
        node = root
        for tok in seq:
            node = node.setdefault(tok, {})
    return root


def brute_force_valid(root: dict, seq) -> list[list[int]]:
    """Sorted valid next tokens at each position of ``seq`` (position 0 = the root)."""
    out, node = [], root
    for tok in seq:
        out.append(sorted(node))
        node = node[tok]
    return out
