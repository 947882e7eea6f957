"""Books catalog + trie: build time (tokenisation apart from the trie), valid-set time, memory.

    python -m experiments.bench.trie

For each tokenizer (SmolLM2, LLaMA-3): time to tokenise the 6,344 quoted titles, time to build
the trie (everything in ``ItemCatalog`` after tokenisation), time to build the padded valid-id
tensors for every row of ``train_sample.csv`` (batches of 8, as training does), and the
tracemalloc peak of a second, untimed catalog build (Python + numpy allocations, MB). Tokenizer loading is
not timed.
"""

from __future__ import annotations

import time
import tracemalloc

from msl_rec.data.catalog import ItemCatalog, load_titles
from msl_rec.data.io import read_samples
from msl_rec.data.tokenizers import load_gguf_tokenizer, load_llama3_tokenizer
from msl_rec.utils.config import PROJECT_ROOT

BOOKS = PROJECT_ROOT / "data" / "books"
BATCH = 8


class _PreTokenized:
    """Replays a tokenizer's output so the catalog's own call costs nothing."""

    def __init__(self, tokenizer, encoded):
        self.eos_token_id = tokenizer.eos_token_id
        self._encoded = encoded

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": self._encoded}


def bench(name: str, tokenizer) -> None:
    titles = load_titles(BOOKS / "id2name4Rec.json", allow_empty_titles=True)
    texts = ['"' + titles[i] + '"' for i in sorted(titles)]
    t0 = time.perf_counter()
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    t_tok = time.perf_counter() - t0

    t0 = time.perf_counter()
    catalog = ItemCatalog(titles, _PreTokenized(tokenizer, encoded))
    t_trie = time.perf_counter() - t0
    # a second build under tracemalloc (which slows it) for the memory figure only
    tracemalloc.start()
    ItemCatalog(titles, _PreTokenized(tokenizer, encoded))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    targets = [s.target for s in read_samples(BOOKS / "train_sample.csv", titles)]
    t0 = time.perf_counter()
    for lo in range(0, len(targets), BATCH):
        catalog.valid_id_tensor(targets[lo:lo + BATCH])
    t_valid = time.perf_counter() - t0
    print(f"{name:8s} items {catalog.num_items:,}  trie nodes {catalog.num_nodes:,}  "
          f"tokenise {t_tok:.3f} s  trie build {t_trie:.3f} s  "
          f"valid sets ({len(targets):,} rows, batches of {BATCH}) {t_valid:.3f} s  "
          f"build peak memory {peak / 2**20:.1f} MB")


def main() -> None:
    for name, load in (("SmolLM2", load_gguf_tokenizer), ("LLaMA-3", load_llama3_tokenizer)):
        bench(name, load())


if __name__ == "__main__":
    main()
