"""Item catalog: titles, their response token sequences and a trie over them.

The response for an item is ``'"' + title + '"'`` tokenised on its own, followed by EOS. Every
sequence ends with EOS, so no sequence is a prefix of another and every trie leaf is an item.

The trie is a ``marisa_trie.Trie`` over every prefix of every sequence (token ids packed into
code points), which gives each prefix a node id, plus the children of each node in CSR form
(``_ptr``, ``_child_tok``, ``_child_node``). Valid-token sets are therefore ``O(1)`` slices and the
per-item path of node ids is precomputed, so a batch's valid sets are gathered without walking
the trie in Python (GENRE's ``get(prefix)`` interface is :meth:`ItemCatalog.allowed`).

Duplicate titles (Books has 9 pairs) share one sequence; :attr:`ItemCatalog.seq_items` maps a
sequence back to the tuple of item ids carrying it, and a recommendation of that sequence is a
hit for any of them.
"""

from __future__ import annotations

import itertools
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import marisa_trie
import numpy as np
import torch

from msl_rec.data.errors import DataError
from msl_rec.data.io import check_int64, read_text

RESPONSE_FORMAT = '"{title}"'
_SURROGATE_START = 0xD800


def _encode(tokens: Sequence[int]) -> str:
    """Pack token ids into a string, one code point per token, skipping the surrogate block."""
    return "".join(chr(t + 1 if t + 1 < _SURROGATE_START else t + 1 + 0x800) for t in tokens)


def _encode_flat(tokens: np.ndarray) -> str:
    """:func:`_encode` of a whole int array at once (via UTF-32), for slicing into keys."""
    codes = tokens.astype(np.uint32) + 1
    codes[codes >= _SURROGATE_START] += 0x800
    return codes.astype("<u4").tobytes().decode("utf-32-le")


def load_titles(item_file: str | Path, allow_empty_titles: bool = False) -> dict[int, str]:
    """Read ``id2name4Rec.json`` (item id -> title); raise :class:`DataError` naming bad entries.

    An empty title is an error unless ``allow_empty_titles`` (the released Books data has one,
    item 5746, and the paper's statistics count it; its response is then ``""`` + EOS).
    """
    path = Path(item_file)
    if not path.is_file():
        raise DataError(f"{path}: item file not found (set dataset.item_file)")
    try:
        raw = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, Mapping):
        raise DataError(f"{path}: expected a JSON object mapping item id -> title")
    titles: dict[int, str] = {}
    key_of: dict[int, str] = {}
    for key, title in raw.items():
        try:
            item_id = check_int64(int(key), f"{path}: item key {key!r}", "item id")
        except ValueError as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{path}: item key {key!r}: item id is not an integer") from None
        if item_id in key_of:
            raise DataError(f"{path}: item keys {key_of[item_id]!r} and {key!r} are both item id {item_id}; "
                            "keep one of them")
        key_of[item_id] = key
        if not isinstance(title, str):
            raise DataError(f"{path}: item {key!r}: field 'title' must be a string, got {type(title).__name__} "
                            f"({title!r}); write the title as a JSON string")
        if not title.strip() and not allow_empty_titles:
            raise DataError(f"{path}: item {key}: field 'title' is empty (set dataset.allow_empty_titles=true to keep it)")
        titles[item_id] = title
    if not titles:
        raise DataError(f"{path}: no items")
    return titles


def warn_undecodable_titles(catalog: ItemCatalog, max_new_tokens: int) -> int:
    """Warn (once per catalog and limit) about titles a decoder capped at ``max_new_tokens`` can
    never produce: responses (title tokens + EOS) longer than the cap. Returns their count."""
    lengths = np.fromiter(map(len, catalog.sequences), dtype=np.int64, count=len(catalog.sequences))
    too_long = [items for items, n in zip(catalog.seq_items, lengths.tolist()) if n > max_new_tokens]
    n_items = sum(len(items) for items in too_long)
    if n_items and max_new_tokens not in catalog.warned_max_new_tokens:
        catalog.warned_max_new_tokens.add(max_new_tokens)
        warnings.warn(
            f"decoder.max_new_tokens={max_new_tokens}: {n_items} catalog item(s) have a response longer than "
            f"that (the longest is {int(lengths.max())} tokens, EOS included; e.g. item {too_long[0][0]}) and can "
            f"never be recommended; raise decoder.max_new_tokens to {int(lengths.max())} to rank every item",
            stacklevel=2)
    return n_items


def eos_token_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise DataError(f"tokenizer {name!r}: field 'eos_token_id' is not set; the response needs an EOS")
    return int(eos)


class ItemCatalog:
    """Catalog items, their response token sequences, and the trie of valid next tokens.

    Attributes:
        titles: item id -> title.
        eos_id: the tokenizer's EOS id, the last token of every sequence.
        sequences: unique response sequences (title tokens + EOS), one list of ids each.
        seq_items: for each sequence, the sorted tuple of item ids whose title gives it.
        item_seq: item id -> index into ``sequences``.
    """

    def __init__(self, titles: Mapping[int, str], tokenizer, response_format: str = RESPONSE_FORMAT):
        self.titles = dict(titles)
        self.response_format = response_format
        self.tokenizer = tokenizer  # BIGRec's grounding re-encodes generated text (bare_text_ids)
        self.eos_id = eos_token_id(tokenizer)
        item_ids = sorted(self.titles)
        texts = [response_format.format(title=self.titles[i]) for i in item_ids]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]

        by_tokens: dict[tuple[int, ...], list[int]] = {}
        for item_id, ids in zip(item_ids, encoded):
            by_tokens.setdefault(tuple(ids) + (self.eos_id,), []).append(item_id)
        ordered = sorted(by_tokens)
        self.sequences: list[list[int]] = [list(s) for s in ordered]
        self.seq_items: list[tuple[int, ...]] = [tuple(by_tokens[s]) for s in ordered]
        self.item_seq: dict[int, int] = {i: k for k, items in enumerate(self.seq_items) for i in items}
        self.warned_max_new_tokens: set[int] = set()  # see warn_undecodable_titles
        self._build_trie()

    @classmethod
    def from_file(cls, item_file: str | Path, tokenizer, response_format: str = RESPONSE_FORMAT,
                  allow_empty_titles: bool = False):
        return cls(load_titles(item_file, allow_empty_titles), tokenizer, response_format)

    # ------------------------------------------------------------------ plain texts (BIGRec's grounding)
    def bare_title_ids(self) -> list[list[int]]:
        """Per sequence, its title as BIGRec embeds it: the bare title (no quotes) tokenised with the
        tokenizer's special tokens (LLaMA's BOS), as ``tokenizer(title)`` in its ``embedding.ipynb``."""
        texts = [self.titles[items[0]].strip(" ").strip('"') or " " for items in self.seq_items]
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]

    def bare_text_ids(self, tokens: Sequence[int]) -> list[int]:
        """A generated response as BIGRec embeds it (``evaluate.py``): decoded without special tokens, its
        quotes stripped (``.strip('"')``), tokenised again with the special tokens."""
        text = self.tokenizer.decode(list(tokens), skip_special_tokens=True).strip('"') or " "
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    # ------------------------------------------------------------------ construction
    def _build_trie(self) -> None:
        """Node ids from marisa, structure from numpy: no Python loop over the trie's nodes.

        ``self.sequences`` is sorted, so sequence ``s`` shares its first ``lcp[s]`` tokens with
        sequence ``s - 1`` and creates the nodes for its longer prefixes; a shared prefix's node is
        the one the latest creating sequence above it made (a forward fill down each column).
        """
        seqs = self.sequences
        n = len(seqs)
        lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=n)
        width = int(lengths.max())
        starts = np.cumsum(lengths) - lengths
        rows = np.repeat(np.arange(n), lengths)
        cols = np.arange(int(lengths.sum())) - np.repeat(starts, lengths)
        # the (sequences x width) work arrays are int32 (ids < 2**31); the kept arrays are int64
        tok = np.full((n, width), -1, dtype=np.int32)
        flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=len(rows))
        tok[rows, cols] = flat
        lcp = np.zeros(n, dtype=np.int64)
        if n > 1:  # distinct, EOS-terminated sequences always differ before the shorter one ends
            lcp[1:] = (tok[1:] != tok[:-1]).argmax(axis=1)
        col = np.arange(width)
        created = (col >= lcp[:, None]) & (col < lengths[:, None])

        packed = _encode_flat(flat)
        new_keys = [packed[a : a + p] for a, lo, hi in zip(starts.tolist(), (lcp + 1).tolist(), (lengths + 1).tolist())
                    for p in range(lo, hi)]
        self._trie = marisa_trie.Trie(new_keys)
        # marisa ids are 0..n-1; node 0 is the root (empty prefix), node i+1 is marisa id i.
        n_nodes = len(self._trie) + 1
        node = np.zeros((n, width), dtype=np.int32)  # node[s, p]: node of sequence s's first p+1 tokens
        node[created] = np.fromiter(map(self._trie.key_id, new_keys), dtype=np.int64, count=len(new_keys)) + 1
        latest = np.maximum.accumulate(np.where(created, np.arange(n, dtype=np.int32)[:, None], 0), axis=0)
        node = node[latest, col]
        before = np.concatenate([np.zeros((n, 1), dtype=np.int32), node[:, :-1]], axis=1)  # node before p

        parent, token, child = (a[created].astype(np.int64) for a in (before, tok, node))
        order = np.lexsort((token, parent))
        self._child_tok = token[order]
        self._child_node = child[order]
        self._ptr = np.zeros(n_nodes + 1, dtype=np.int64)
        np.cumsum(np.bincount(parent, minlength=n_nodes), out=self._ptr[1:])
        # terminal node (after EOS) -> sequence index, and each sequence's path of nodes
        self._terminal = dict(zip(node[np.arange(n), lengths - 1].tolist(), range(n)))
        self._paths = [before[s, :length].astype(np.int64) for s, length in enumerate(lengths.tolist())]
        self._fanout = np.diff(self._ptr)

    # ------------------------------------------------------------------ trie queries
    @property
    def num_items(self) -> int:
        return len(self.titles)

    @property
    def num_nodes(self) -> int:
        return len(self._ptr) - 1

    def children(self, node: int) -> tuple[np.ndarray, np.ndarray]:
        """Sorted valid next-token ids after ``node`` and the child node each leads to."""
        lo, hi = self._ptr[node], self._ptr[node + 1]
        return self._child_tok[lo:hi], self._child_node[lo:hi]

    def fanout(self, node: int) -> int:
        return int(self._fanout[node])

    def children_csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The whole trie in CSR form, read-only views ``(ptr, child_tok, child_node)``: node ``n``'s
        children are ``child_tok[ptr[n]:ptr[n + 1]]`` (sorted token ids) leading to the same slice of
        ``child_node``. For vectorised search over many nodes at once (beam search)."""
        views = [a.view() for a in (self._ptr, self._child_tok, self._child_node)]
        for a in views:
            a.flags.writeable = False
        return views[0], views[1], views[2]

    def node_of(self, prefix: Sequence[int]) -> int | None:
        """Node id of a token prefix, or None if no sequence starts with it."""
        if len(prefix) == 0:
            return 0
        kid = self._trie.get(_encode(prefix))
        return None if kid is None else kid + 1

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """GENRE-style ``get``: valid next-token ids after ``prefix`` (empty if it leads nowhere)."""
        node = self.node_of(prefix)
        return [] if node is None else self.children(node)[0].tolist()

    def sequence_at(self, node: int) -> int | None:
        """Sequence index if ``node`` is a leaf (the prefix ends with EOS), else None."""
        return self._terminal.get(node)

    def items_for(self, tokens: Sequence[int]) -> tuple[int, ...]:
        """Item ids whose response is exactly ``tokens`` (EOS included); () if none."""
        node = self.node_of(tokens)
        seq = None if node is None else self._terminal.get(node)
        return () if seq is None else self.seq_items[seq]

    # ------------------------------------------------------------------ per-item views
    def response_ids(self, item_id: int) -> list[int]:
        """The response token ids of an item: title tokens then EOS."""
        return self.sequences[self._seq(item_id)]

    def valid_ids(self, item_id: int) -> list[np.ndarray]:
        """Valid next-token ids at each response position of ``item_id`` (position 0 = trie root)."""
        return [self.children(n)[0] for n in self._paths[self._seq(item_id)]]

    def valid_counts(self, item_id: int) -> np.ndarray:
        """Number of valid next tokens at each response position of ``item_id``."""
        return self._fanout[self._paths[self._seq(item_id)]]

    def valid_id_tensor(self, item_ids: Sequence[int]) -> torch.Tensor:
        """Padded ``(batch, positions, K)`` int64 tensor of valid ids, -1 where there is none.

        ``positions`` is the longest response in the batch and ``K`` its largest valid set; the
        row for position ``p`` of sample ``b`` lists the ids valid after ``p`` response tokens.
        """
        paths = [self._paths[self._seq(i)] for i in item_ids]
        n_pos = max(len(p) for p in paths)
        k = max(int(self._fanout[p].max()) for p in paths)
        out = np.full((len(paths), n_pos, k), -1, dtype=np.int64)
        for b, path in enumerate(paths):
            for p, node in enumerate(path):
                lo, hi = self._ptr[node], self._ptr[node + 1]
                out[b, p, : hi - lo] = self._child_tok[lo:hi]
        return torch.from_numpy(out)

    def _seq(self, item_id: int) -> int:
        try:
            return self.item_seq[int(item_id)]
        except KeyError:
            raise DataError(f"item id {item_id} is not in the catalog") from None
