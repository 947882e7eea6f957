"""Build a run's data side from its config: tokenizer, item catalog and data module.

The ``data`` and ``dataset`` nodes are typed (msl_rec/utils/schema.py ``DataConfig``, ``DatasetConfig``):
a batch size that is not a whole number fails when the config is composed; the data module checks the
values a type cannot express (row counts >= 1).
"""

from __future__ import annotations

from omegaconf import DictConfig

from msl_rec.data.catalog import ItemCatalog
from msl_rec.data.datamodule import RecDataModule
from msl_rec.data.io import dataset_file
from msl_rec.data.prompts import SlotPromptBuilder
from msl_rec.data.sequences import SequenceDataModule, TitleCatalog
from msl_rec.data.tokenizers import load_tokenizer


def is_sequential(cfg: DictConfig) -> bool:
    """Whether the run's method is an item-ID sequential model (``method.kind: sequential``), not an LLM."""
    method = cfg.get("method")
    return bool(method) and method.get("kind", "llm") == "sequential"


def is_hybrid(cfg: DictConfig) -> bool:
    """Whether the run's method is an LLM reading a sequential encoder's embeddings (``method.kind: hybrid``)."""
    method = cfg.get("method")
    return bool(method) and method.get("kind", "llm") == "hybrid"


def slot_builder(cfg: DictConfig, tokenizer, catalog: ItemCatalog) -> SlotPromptBuilder:
    """A hybrid method's prompt builder: slot ids from the tokenizer's size on, items in the encoder's order
    (:class:`TitleCatalog` of the same item file, which the encoder's checkpoint is checked against)."""
    prompt = dict(cfg.method.get("prompt") or {})
    return SlotPromptBuilder.from_config(cfg.dataset, tokenizer, catalog.titles, slot_base=len(tokenizer),
                                         index_of=TitleCatalog(catalog.titles).index_of, **prompt)


def build_data(cfg: DictConfig, num_negatives: int = 0):
    """Tokenizer, item catalog and data module for ``cfg.dataset`` and ``cfg.backbone``; for a sequential
    method no tokenizer (None), the catalog grouped by title and item-index sequences of ``model.max_len``."""
    dataset_file(cfg.dataset, "item_file")  # a dataset not built yet: an error naming the command that builds it
    d = cfg.data
    if is_sequential(cfg):
        catalog = TitleCatalog.from_file(cfg.dataset.item_file, allow_empty_titles=cfg.dataset.allow_empty_titles)
        dm = SequenceDataModule(cfg.dataset, catalog, max_len=int(cfg.model.max_len),
                                micro_batch_size=d.micro_batch_size, eval_batch_size=d.eval_batch_size,
                                train_subset=d.train_subset, valid_subset=d.valid_subset, test_subset=d.test_subset,
                                sample=d.sample, seed=cfg.seed, num_workers=d.num_workers,
                                teacher_run=cfg.method.get("teacher_run"))  # DLLM2Rec's teacher (training only)
        return None, catalog, dm
    tokenizer = load_tokenizer(cfg.backbone.tokenizer)
    catalog = ItemCatalog.from_file(cfg.dataset.item_file, tokenizer, allow_empty_titles=cfg.dataset.allow_empty_titles)
    dm = RecDataModule(cfg.dataset, tokenizer, catalog, micro_batch_size=d.micro_batch_size,
                       eval_batch_size=d.eval_batch_size, train_subset=d.train_subset, valid_subset=d.valid_subset,
                       test_subset=d.test_subset, num_negatives=num_negatives, fixed_negatives=d.fixed_negatives,
                       seed=cfg.seed, num_workers=d.num_workers, sample=d.sample,
                       bucket_by_length=d.bucket_by_length,
                       builder=slot_builder(cfg, tokenizer, catalog) if is_hybrid(cfg) else None)
    return tokenizer, catalog, dm
