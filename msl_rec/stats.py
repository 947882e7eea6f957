"""``msl-rec-stats``: Table-4-style statistics of a dataset under a backbone's tokenizer.

Definitions (all over ``dataset.train_file``):

* users: distinct ``user_id`` values in the file.
* items: catalog items (entries of ``dataset.item_file``).
* interactions: distinct ``(user, item)`` pairs over all ids of all rows (history and target).
* density: interactions / (users x items).
* avg title tokens: tokens of a quoted title ``"Title"`` (the response without EOS), averaged
  over catalog items.
* AVT: valid next tokens (trie fan-out) at every response position of every row's target, the
  EOS-predicting position included, averaged over all those positions pooled.

    msl-rec-stats dataset=books backbone=llama3_8b    # AVT: 70.69

``show_prompt=1`` also prints, as one JSON line, the first train row's prompt exactly as training
builds it: ``{"prompt": <text>, "prompt_ids": [...], "response_ids": [...]}``.
"""

from __future__ import annotations

import json

import hydra
import numpy as np
from omegaconf import DictConfig

from msl_rec.data.catalog import ItemCatalog
from msl_rec.data.io import Sample, dataset_file, read_samples
from msl_rec.data.prompts import PromptBuilder
from msl_rec.data.tokenizers import load_tokenizer
from msl_rec.utils.config import CONFIG_DIR


def dataset_stats(samples: list[Sample], catalog: ItemCatalog) -> dict[str, float]:
    """The statistics of this module's docstring for ``samples`` (rows of one file)."""
    users = {s.user_id for s in samples}
    pairs = {(s.user_id, i) for s in samples for i in s.item_ids}
    counts = np.concatenate([catalog.valid_counts(s.target) for s in samples])
    title_tokens = [len(catalog.response_ids(i)) - 1 for i in catalog.titles]
    return {
        "rows": len(samples),
        "users": len(users),
        "items": catalog.num_items,
        "interactions": len(pairs),
        "density": len(pairs) / (len(users) * catalog.num_items),
        "avg_title_tokens": float(np.mean(title_tokens)),
        "avt": float(counts.mean()),
    }


def prompt_record(sample: Sample, builder: PromptBuilder, catalog: ItemCatalog) -> dict:
    """The prompt text, prompt ids and response ids training uses for ``sample``."""
    response = catalog.response_ids(sample.target)
    [(start, prompt_ids)] = builder.fit_batch([sample.history], [len(response)])
    return {"prompt": builder.text(sample.history[start:]), "prompt_ids": prompt_ids, "response_ids": response}


def format_stats(stats: dict[str, float], name: str, backbone: str) -> str:
    return "\n".join([
        f"dataset: {name}  tokenizer: {backbone}",
        f"rows (windows): {stats['rows']:,}",
        f"users (distinct in the file): {stats['users']:,}",
        f"items (catalog): {stats['items']:,}",
        f"interactions (distinct user-item pairs in the file): {stats['interactions']:,}",
        f"density: {stats['density']:.4%}",
        f"avg title tokens (quoted title, no EOS): {stats['avg_title_tokens']:.2f}",
        f"AVT: {stats['avt']:.2f}",
    ])


def stats(cfg: DictConfig) -> dict[str, float]:
    item_file, train_file = dataset_file(cfg.dataset, "item_file"), dataset_file(cfg.dataset, "train_file")
    tokenizer = load_tokenizer(cfg.backbone.tokenizer)
    catalog = ItemCatalog.from_file(item_file, tokenizer,
                                    allow_empty_titles=cfg.dataset.get("allow_empty_titles", False))
    samples = read_samples(train_file, catalog.titles)
    result = dataset_stats(samples, catalog)
    print(format_stats(result, cfg.dataset.name, cfg.backbone.name))
    if cfg.get("show_prompt"):
        builder = PromptBuilder.from_config(cfg.dataset, tokenizer, catalog.titles)
        print(json.dumps(prompt_record(samples[0], builder, catalog), ensure_ascii=False))
    return result


@hydra.main(config_path=CONFIG_DIR, config_name="stats", version_base="1.3")
def main(cfg: DictConfig) -> None:
    stats(cfg)


if __name__ == "__main__":
    main()
