"""The data side of the sequential recommenders (``method=sasrec|bert4rec``): the BIGRec CSVs as item-index
sequences, with no tokenizer.

The same files, rows, users and targets as the LLM runs (:func:`~msl_rec.data.io.read_samples`): each row's
history (its last ``max_len`` items, oldest first) predicts its target. Item ids are mapped to indices
``0 .. num_items-1`` in id order; ``num_items`` pads a history (right-padded, as the DROS / LLaRA SASRec).

:class:`TitleCatalog` is the catalog the evaluation ranks: items grouped by identical title, as
:class:`~msl_rec.data.catalog.ItemCatalog` groups them by identical response (Books has 9 shared titles), so a
sequential model and an LLM are scored against the same list of recommendable entries; a group's score is the
best of its items'.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from msl_rec.data.catalog import load_titles
from msl_rec.data.datamodule import EpochShuffleSampler, row_count, sample_rows
from msl_rec.data.io import Sample, dataset_file, read_samples


class TitleCatalog:
    """Catalog items as model indices, grouped by title (no tokenizer).

    Attributes:
        titles: item id -> title.
        item_ids: (num_items,) int64, item id of each model index (ascending).
        index_of: item id -> model index.
        seq_items: per title group, the sorted tuple of its item ids; groups ordered by their smallest id.
        item_seq: item id -> its group.
        item_group: (num_items,) int64, model index -> group (what a ranker reduces scores over).
    """

    def __init__(self, titles: Mapping[int, str]):
        self.titles = dict(titles)
        self.item_ids = np.array(sorted(self.titles), dtype=np.int64)
        self.index_of = {int(i): k for k, i in enumerate(self.item_ids.tolist())}
        groups: dict[str, list[int]] = {}
        for item in self.item_ids.tolist():
            groups.setdefault(self.titles[item], []).append(item)
        self.seq_items: list[tuple[int, ...]] = sorted(tuple(g) for g in groups.values())
        self.item_seq: dict[int, int] = {i: s for s, items in enumerate(self.seq_items) for i in items}
        self.item_group = np.array([self.item_seq[int(i)] for i in self.item_ids], dtype=np.int64)

    @classmethod
    def from_file(cls, item_file, allow_empty_titles: bool = False) -> TitleCatalog:
        return cls(load_titles(item_file, allow_empty_titles))

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the item ids in index order: what a model's item indices mean (a checkpoint records it)."""
        return hashlib.sha256(",".join(map(str, self.item_ids.tolist())).encode()).hexdigest()

    @property
    def num_groups(self) -> int:
        return len(self.seq_items)

    def indices(self, item_ids: Sequence[int]) -> list[int]:
        return [self.index_of[int(i)] for i in item_ids]


class SequenceDataset(Dataset):
    """One split's rows as ``(history indices, target index)``; item ``i`` is split row ``i``."""

    def __init__(self, samples: list[Sample], catalog: TitleCatalog, max_len: int):
        self.samples = samples
        self.history = [catalog.indices(s.history[-max_len:]) for s in samples]
        self.targets = catalog.indices([s.target for s in samples])

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Nothing to redraw per epoch (the sampler calls it; BCE's negatives are drawn in the loss)."""

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        return {"history": self.history[i], "target": self.targets[i], "target_id": s.target, "user_id": s.user_id}


class SequenceCollator:
    """Rows -> ``history`` (B, max_len) right-padded with ``num_items``, ``lengths`` (B,), ``targets`` (B,)
    indices, ``target_ids`` / ``user_ids`` (B,) as in the LLM batches."""

    def __init__(self, max_len: int, padding_index: int):
        self.max_len, self.padding_index = max_len, padding_index

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        history = torch.full((len(rows), self.max_len), self.padding_index, dtype=torch.long)
        for b, r in enumerate(rows):
            history[b, : len(r["history"])] = torch.tensor(r["history"], dtype=torch.long)
        return {"history": history, "lengths": torch.tensor([len(r["history"]) for r in rows], dtype=torch.long),
                "targets": torch.tensor([r["target"] for r in rows], dtype=torch.long),
                "target_ids": torch.tensor([r["target_id"] for r in rows], dtype=torch.long),
                "user_ids": torch.tensor([r["user_id"] for r in rows], dtype=torch.long)}


class SequenceDataModule(L.LightningDataModule):
    """Train/valid/test loaders of item-index sequences over the BIGRec CSVs (the LLM runs' rows).

    The same selection keys as :class:`~msl_rec.data.datamodule.RecDataModule` (``train_subset``, ``sample``,
    ``valid_subset``, ``test_subset``), the same seeded epoch shuffle (:class:`EpochShuffleSampler`, DDP-aware,
    resumable mid-epoch) and the same evaluation interface (``eval_samples``, ``eval_lengths``,
    ``eval_dataloader``, ``train_targets``, ``prompt_preamble`` = None).
    """

    def __init__(self, dataset_cfg, catalog: TitleCatalog, max_len: int, micro_batch_size: int = 256,
                 eval_batch_size: int = 256, train_subset: int | None = None, valid_subset: int | None = None,
                 test_subset: int | None = None, sample: int | None = None, seed: int = 0, num_workers: int = 0):
        super().__init__()
        if micro_batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"data.micro_batch_size={micro_batch_size}, data.eval_batch_size={eval_batch_size}: "
                             "both must be >= 1")
        if max_len < 1:
            raise ValueError(f"model.max_len={max_len}: must be >= 1 (history items a model reads)")
        train_subset, valid_subset, test_subset, sample = (
            row_count(f"data.{key}", value) for key, value in (("train_subset", train_subset),
                                                              ("valid_subset", valid_subset),
                                                              ("test_subset", test_subset), ("sample", sample)))
        if sample is not None and train_subset is not None:
            raise ValueError(f"data.sample={sample} and data.train_subset={train_subset} both select train rows; "
                             "set one of them to null")
        self.cfg, self.catalog, self.max_len = dataset_cfg, catalog, int(max_len)
        self.micro_batch_size, self.eval_batch_size = micro_batch_size, eval_batch_size
        self.subsets = {"train": train_subset, "valid": valid_subset, "test": test_subset}
        self.sample, self.seed, self.num_workers = sample, seed, num_workers
        self.collator = SequenceCollator(self.max_len, catalog.num_items)
        self.datasets: dict[str, SequenceDataset] = {}
        self.train_targets: list[int] = []
        self._train_sampler: EpochShuffleSampler | None = None
        self.epoch = 0

    prompt_preamble = None  # no prompt: nothing for an LLM runner to share

    def _load(self, split: str) -> SequenceDataset | None:
        if split in self.datasets:
            return self.datasets[split]
        path = dataset_file(self.cfg, f"{split}_file")
        if path is None:
            return None
        samples = read_samples(path, self.catalog.titles)
        if self.subsets[split] is not None:
            samples = samples[: self.subsets[split]]
        if split == "train" and self.sample is not None:
            samples = sample_rows(samples, self.sample, self.seed, path)
        self.datasets[split] = SequenceDataset(samples, self.catalog, self.max_len)
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            train = self._load("train")
            self.train_targets = [s.target for s in train.samples] if train else []
        if stage in (None, "fit", "validate"):
            self._load("valid")
        if stage in (None, "test"):
            self._load("test")

    def train_item_counts(self) -> torch.Tensor:
        """(num_items,) float: how often each item is a training target (DROS's nominal distribution)."""
        counts = torch.zeros(self.catalog.num_items, dtype=torch.float64)
        for t in self._require("train").targets:
            counts[t] += 1
        return counts

    def _require(self, split: str) -> SequenceDataset:
        ds = self._load(split)
        if ds is None:
            raise ValueError(f"dataset.{split}_file is null; no {split} rows")
        return ds

    # ---------------------------------------------------------------- the evaluation interface
    def eval_samples(self, split: str) -> list[Sample]:
        return self._require(split).samples

    def eval_lengths(self, split: str) -> list[int]:
        return [len(h) for h in self._require(split).history]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self._train_sampler is not None:
            self._train_sampler.epoch = int(epoch)

    def _loader(self, split: str, batch_size: int, sampler=None, rows: Sequence[int] | None = None) -> DataLoader:
        ds = self._require(split)
        return DataLoader(Subset(ds, rows) if rows is not None else ds, batch_size=batch_size, sampler=sampler,
                          collate_fn=self.collator, num_workers=self.num_workers)

    def eval_dataloader(self, split: str, rows: Sequence[int] | None = None) -> DataLoader:
        return self._loader(split, self.eval_batch_size, rows=rows)

    def train_dataloader(self) -> DataLoader:
        ds = self._require("train")
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        self._train_sampler = EpochShuffleSampler(ds, self.seed, None, self.micro_batch_size,
                                                  num_replicas=replicas, rank=rank)
        self._train_sampler.set_epoch(self.epoch)
        return self._loader("train", self.micro_batch_size, self._train_sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)
