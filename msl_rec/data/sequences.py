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

import numpy as np
import torch
from torch.utils.data import Dataset

from msl_rec.data.catalog import load_titles
from msl_rec.data.datamodule import SplitDataModule
from msl_rec.data.io import Sample, dataset_file
from msl_rec.data.teacher import TeacherLists, load_teacher


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
    """One split's rows as ``(history indices, target index)``; item ``i`` is split row ``i``.
    ``teacher`` (DLLM2Rec, training rows only): each row also carries its teacher list."""

    def __init__(self, samples: list[Sample], catalog: TitleCatalog, max_len: int):
        self.samples = samples
        self.epoch = 0
        self.teacher: TeacherLists | None = None
        self.history = [catalog.indices(s.history[-max_len:]) for s in samples]
        self.targets = catalog.indices([s.target for s in samples])

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """The sampler's epoch (nothing to redraw: BCE's negatives are drawn in the loss)."""
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        row = {"history": self.history[i], "target": self.targets[i], "target_id": s.target, "user_id": s.user_id}
        return row if self.teacher is None else {**row, **self.teacher.row(i)}


class SequenceCollator:
    """Rows -> ``history`` (B, max_len) right-padded with ``num_items``, ``lengths`` (B,), ``targets`` (B,)
    indices, ``target_ids`` / ``user_ids`` (B,) as in the LLM batches; rows with a teacher list also
    ``teacher_items`` (B, W) int64 and ``teacher_distance`` (B, W) float32 (:class:`TeacherLists`)."""

    def __init__(self, max_len: int, padding_index: int):
        self.max_len, self.padding_index = max_len, padding_index

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        history = torch.full((len(rows), self.max_len), self.padding_index, dtype=torch.long)
        for b, r in enumerate(rows):
            history[b, : len(r["history"])] = torch.tensor(r["history"], dtype=torch.long)
        batch = {"history": history, "lengths": torch.tensor([len(r["history"]) for r in rows], dtype=torch.long),
                 "targets": torch.tensor([r["target"] for r in rows], dtype=torch.long),
                 "target_ids": torch.tensor([r["target_id"] for r in rows], dtype=torch.long),
                 "user_ids": torch.tensor([r["user_id"] for r in rows], dtype=torch.long)}
        for key in ("teacher_items", "teacher_distance"):
            if key in rows[0]:
                batch[key] = torch.stack([r[key] for r in rows])
        return batch


class SequenceDataModule(SplitDataModule):
    """Train/valid/test loaders of item-index sequences over the BIGRec CSVs (the LLM runs' rows): the same
    row selection, seeded train order and evaluation interface as the LLM's
    (:class:`~msl_rec.data.datamodule.SplitDataModule`); ``prompt_preamble`` None (no prompt).
    ``teacher_run`` (DLLM2Rec): an LLM's ``msl-rec-eval split=train`` folder; :meth:`teacher_lists` joins its
    lists to the training rows, whose batches then carry them."""

    prompt_preamble = None

    def __init__(self, dataset_cfg, catalog: TitleCatalog, max_len: int, micro_batch_size: int = 256,
                 eval_batch_size: int = 256, train_subset: int | None = None, valid_subset: int | None = None,
                 test_subset: int | None = None, sample: int | None = None, seed: int = 0, num_workers: int = 0,
                 teacher_run: str | None = None):
        if max_len < 1:
            raise ValueError(f"model.max_len={max_len}: must be >= 1 (history items a model reads)")
        super().__init__(dataset_cfg, catalog, SequenceCollator(int(max_len), catalog.num_items), micro_batch_size,
                         eval_batch_size, train_subset, valid_subset, test_subset, sample, seed, num_workers)
        self.max_len = int(max_len)
        self.teacher_run = teacher_run

    def teacher_lists(self) -> TeacherLists:
        """The teacher's lists joined to the training rows (read once; then every training batch carries them).
        Only when training (an evaluation of a DLLM2Rec run never reads its teacher)."""
        train = self._require("train")
        if train.teacher is None:
            if not self.teacher_run:
                raise ValueError("SequenceDataModule.teacher_lists: no method.teacher_run")
            if self.sample is not None:
                raise ValueError(f"data.sample={self.sample} draws random training rows, but the teacher's lists "
                                 f"({self.teacher_run}) are joined by training-file row; use data.train_subset=N")
            train.teacher = load_teacher(self.teacher_run, train.samples, self.catalog.index_of,
                                         dataset_file(self.cfg, "train_file"), dataset_file(self.cfg, "item_file"))
        return train.teacher

    def make_dataset(self, split: str, samples: list[Sample]) -> SequenceDataset:
        return SequenceDataset(samples, self.catalog, self.max_len)

    def split_samples(self, split: str) -> list[Sample]:
        return self.datasets[split].samples

    def row_lengths(self, split: str) -> list[int]:
        """History items read per row."""
        return [len(h) for h in self.datasets[split].history]

    def train_item_counts(self) -> torch.Tensor:
        """(num_items,) float: how often each item is a training target (DROS's nominal distribution)."""
        counts = torch.zeros(self.catalog.num_items, dtype=torch.float64)
        for t in self._require("train").targets:
            counts[t] += 1
        return counts
