"""Data: BIGRec CSVs, prompts, the item catalog + trie, and the Lightning DataModule."""

from msl_rec.data.catalog import ItemCatalog, load_titles
from msl_rec.data.datamodule import RecDataModule
from msl_rec.data.errors import DataError
from msl_rec.data.io import Sample, read_samples
from msl_rec.data.prompts import ALPACA_TEMPLATE, PromptBuilder

__all__ = ["ALPACA_TEMPLATE", "DataError", "ItemCatalog", "PromptBuilder", "RecDataModule", "Sample",
           "load_titles", "read_samples"]
