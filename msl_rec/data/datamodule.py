"""The Lightning DataModule: BIGRec CSVs -> tokenised prompts + responses -> padded batches.

Batch contract (every tensor int64; ``B`` samples, ``T`` the longest prompt+response in the batch):

* ``input_ids`` (B, T): LEFT-padded prompt ids followed by the target's response ids.
* ``attention_mask`` (B, T): 1 on real tokens, 0 on padding.
* ``labels`` (B, T): -100 on padding and prompt, the response ids (``catalog.response_ids``,
  EOS included) on the response positions. Labels are built from the response ids, so the pad
  id (``tokenizer.pad_token_id``, or EOS when that is None) never reaches them even when it equals EOS.
* ``response_len`` (B,): response tokens per row (EOS included); the response is the row's tail.
* ``valid_ids`` (B, P, K): ``catalog.valid_id_tensor(target_ids)``, -1 padded; position ``p``
  lists the ids valid after ``p`` response tokens (``P`` = longest response in the batch).
* ``target_ids`` (B,), ``user_ids`` (B,).
* ``prompt_input_ids``, ``prompt_attention_mask`` (B, Tp): the prompt alone, left-padded (decoding).
* only when ``num_negatives > 0``: ``neg_item_ids`` (B, n); ``neg_input_ids``,
  ``neg_attention_mask``, ``neg_labels`` (B*n, T2), same layout as the positives, rows ordered
  sample-major (row ``b * n + j`` is negative ``j`` of sample ``b``), each with sample ``b``'s prompt.

Negatives are drawn uniformly from catalog items, never the target, an item sharing the
target's title, or an item of the user's history, and distinct in response text from each other.
They are seeded by ``(seed, epoch, sample index)``: redrawn each epoch (the train sampler's
``set_epoch``, which Lightning calls before each epoch, forwards to :meth:`RecDataModule.set_epoch`),
or always epoch 0's when ``fixed_negatives``. A negative reuses the positive's prompt, so a
negative row may exceed ``cutoff_len`` by the difference in response lengths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from msl_rec.data.catalog import ItemCatalog
from msl_rec.data.errors import DataError
from msl_rec.data.io import Sample, dataset_file, read_samples
from msl_rec.data.prompts import PromptBuilder

IGNORE_INDEX = -100
BATCH_KEYS = ("input_ids", "attention_mask", "labels", "response_len", "valid_ids", "target_ids", "user_ids",
              "prompt_input_ids", "prompt_attention_mask")
NEGATIVE_KEYS = ("neg_item_ids", "neg_input_ids", "neg_attention_mask", "neg_labels")


@dataclass(frozen=True)
class EncodedSample:
    """A sample with its prompt ids (already fitted to ``cutoff_len``) and response ids."""

    sample: Sample
    prompt_ids: list[int]
    response_ids: list[int]


def pad_id_of(tokenizer, catalog: ItemCatalog) -> int:
    """``tokenizer.pad_token_id``, or EOS when the tokenizer has no pad token."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return catalog.eos_id if pad is None else int(pad)


def left_pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """``(len(rows), longest)`` int64 tensor, each row right-aligned, ``value`` on the left."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for b, r in enumerate(rows):
        if len(r):
            out[b, width - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
    return out


def encode_samples(samples: Sequence[Sample], builder: PromptBuilder, catalog: ItemCatalog) -> list[EncodedSample]:
    """Tokenise every prompt once (one batch call) and attach each target's response ids."""
    responses = [catalog.response_ids(s.target) for s in samples]
    prompts = builder.build_batch([s.history for s in samples], [len(r) for r in responses])
    return [EncodedSample(s, p, r) for s, p, r in zip(samples, prompts, responses)]


def sample_negatives(catalog: ItemCatalog, sample: Sample, n: int, rng: np.random.Generator,
                     items: np.ndarray | None = None) -> list[int]:
    """``n`` item ids drawn uniformly from the catalog by rejection, excluding the target, items
    sharing its title, the history, and repeats of an already drawn response text."""
    items = np.fromiter(sorted(catalog.titles), dtype=np.int64) if items is None else items
    banned_items = set(sample.history)
    used_seqs = {catalog.item_seq[sample.target]}
    n_free = len({catalog.item_seq[int(i)] for i in items} - used_seqs - {catalog.item_seq[i] for i in banned_items})
    if n_free < n:
        raise ValueError(f"cannot draw {n} negatives for user {sample.user_id}: only {n_free} eligible titles")
    out: list[int] = []
    while len(out) < n:
        for item in rng.choice(items, size=2 * n):
            item = int(item)
            seq = catalog.item_seq[item]
            if item in banned_items or seq in used_seqs:
                continue
            out.append(item)
            used_seqs.add(seq)
            if len(out) == n:
                break
    return out


class RecDataset(Dataset):
    """Encoded samples; draws negatives per item access when ``num_negatives > 0``."""

    def __init__(self, encoded: list[EncodedSample], catalog: ItemCatalog, num_negatives: int = 0,
                 fixed_negatives: bool = False, seed: int = 0):
        self.encoded = encoded
        self.catalog = catalog
        self.num_negatives = num_negatives
        self.fixed_negatives = fixed_negatives
        self.seed = seed
        self.epoch = 0
        self._items = np.fromiter(sorted(catalog.titles), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.encoded)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def negatives(self, index: int) -> list[int]:
        epoch = 0 if self.fixed_negatives else self.epoch
        rng = np.random.default_rng([self.seed, epoch, index])
        return sample_negatives(self.catalog, self.encoded[index].sample, self.num_negatives, rng, self._items)

    def __getitem__(self, index: int) -> dict:
        enc = self.encoded[index]
        row = {"enc": enc}
        if self.num_negatives > 0:
            row["negatives"] = self.negatives(index)
        return row


class EpochShuffleSampler(DistributedSampler):
    """The train order: a pure function of ``(seed, epoch)`` (and the rank), length-bucketed on request.

    1. A permutation of all rows seeded by ``(seed, epoch)``, padded by repeating its head to a
       multiple of ``num_replicas`` (as :class:`DistributedSampler`; no padding on one process).
    2. With ``lengths`` (bucketing): within each mega-batch of ``bucket_batches`` global batches
       (``micro_batch_size x num_replicas`` rows) of that order, rows are sorted by length, so a
       micro-batch holds rows of similar length and padding drops.
    3. The order is cut into global batches; with bucketing their order is shuffled (same
       generator), the one short last batch staying last so no micro-batch is split.
    4. Each global batch gives every rank an equal, contiguous share (``micro_batch_size`` rows
       of a full one), so ranks are disjoint and see the same number of micro-batches.

    Without ``lengths`` on one process this is ``torch.randperm`` seeded by ``(seed, epoch)``.
    ``set_epoch`` also sets the dataset's epoch, so negatives are redrawn per epoch without any
    extra callback (Lightning calls it). A :class:`DistributedSampler`, so Lightning does not
    wrap it again under DDP.

    Args:
        dataset: the train :class:`RecDataset`.
        seed: seeds the order.
        lengths: per-row token counts to bucket by; None: no bucketing.
        micro_batch_size: rows per micro-batch (the DataLoader's batch size).
        bucket_batches: global batches per mega-batch sorted together.
        num_replicas, rank: the DDP world size and this process's rank.
    """

    def __init__(self, dataset: RecDataset, seed: int = 0, lengths: Sequence[int] | None = None,
                 micro_batch_size: int = 1, bucket_batches: int = 50, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        if lengths is not None and len(lengths) != len(dataset):
            raise ValueError(f"lengths has {len(lengths)} entries for {len(dataset)} rows")
        self.dataset = dataset
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.micro_batch_size = int(micro_batch_size)
        self.bucket_batches = int(bucket_batches)
        self.start = 0  # mid-epoch resume: the next iteration begins at this position of the order

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.dataset.set_epoch(epoch)

    def global_order(self) -> list[list[int]]:
        """This epoch's global batches, each a list of row indices (all ranks' shares in rank order)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.dataset), generator=g).tolist()
        pad = self.total_size - len(order)
        order += (order * (pad // max(len(order), 1) + 1))[:pad]
        step = self.micro_batch_size * self.num_replicas
        if self.lengths is not None:
            mega = step * self.bucket_batches
            order = [i for a in range(0, len(order), mega)
                     for i in sorted(order[a:a + mega], key=lambda i: -int(self.lengths[i]))]
        batches = [order[a:a + step] for a in range(0, len(order), step)]
        if self.lengths is not None:
            n_full = len(batches) - (len(batches[-1]) < step if batches else 0)
            batches[:n_full] = [batches[k] for k in torch.randperm(n_full, generator=g).tolist()]
        return batches

    def resume_at(self, position: int) -> None:
        """Begin the next iteration at ``position`` of this rank's order (msl_rec.utils.callbacks.MidEpochResume)."""
        self.start = int(position)

    def __iter__(self):
        out: list[int] = []
        for batch in self.global_order():
            share = len(batch) // self.num_replicas
            out += batch[self.rank * share:(self.rank + 1) * share]
        start, self.start = self.start, 0
        return iter(out[start:])


class Collator:
    """Pad a list of dataset rows into the batch contract of this module's docstring."""

    def __init__(self, catalog: ItemCatalog, pad_id: int):
        self.catalog = catalog
        self.pad_id = pad_id

    def _rows(self, prompts: list[list[int]], responses: list[list[int]]) -> dict[str, torch.Tensor]:
        seqs = [p + r for p, r in zip(prompts, responses)]
        labels = [[IGNORE_INDEX] * len(p) + list(r) for p, r in zip(prompts, responses)]
        return {
            "input_ids": left_pad(seqs, self.pad_id),
            "attention_mask": left_pad([[1] * len(s) for s in seqs], 0),
            "labels": left_pad(labels, IGNORE_INDEX),
        }

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        encs: list[EncodedSample] = [r["enc"] for r in rows]
        prompts = [e.prompt_ids for e in encs]
        targets = [e.sample.target for e in encs]
        batch = self._rows(prompts, [e.response_ids for e in encs])
        batch["response_len"] = torch.tensor([len(e.response_ids) for e in encs], dtype=torch.long)
        batch["valid_ids"] = self.catalog.valid_id_tensor(targets)
        batch["target_ids"] = torch.tensor(targets, dtype=torch.long)
        batch["user_ids"] = torch.tensor([e.sample.user_id for e in encs], dtype=torch.long)
        batch["prompt_input_ids"] = left_pad(prompts, self.pad_id)
        batch["prompt_attention_mask"] = left_pad([[1] * len(p) for p in prompts], 0)
        if "negatives" in rows[0]:
            negs = [r["negatives"] for r in rows]
            neg_prompts = [p for p, ns in zip(prompts, negs) for _ in ns]
            neg_resp = [self.catalog.response_ids(i) for ns in negs for i in ns]
            batch["neg_item_ids"] = torch.tensor(negs, dtype=torch.long)
            for key, value in self._rows(neg_prompts, neg_resp).items():
                batch["neg_" + key] = value
        return batch


def sample_rows(samples: list[Sample], n: int, seed: int, path=None) -> list[Sample]:
    """``n`` rows drawn without replacement with ``seed``, kept in file order."""
    if n > len(samples):
        raise DataError(f"{path}: data.sample={n} but the file has only {len(samples)} rows; "
                        f"lower data.sample or set it to null")
    rows = np.random.default_rng(seed).choice(len(samples), size=n, replace=False)
    return [samples[i] for i in sorted(rows.tolist())]


def row_count(key: str, value) -> int | None:
    """``value`` of the config key ``key`` (``data.train_subset``, ``data.sample`` ...) as a number of
    rows >= 1, or None (keep all). 0 would leave the split empty and a negative N would silently drop
    the LAST N rows (``rows[:-N]``), so both are a ValueError naming the key, as is a non-integer."""
    if value is None:
        return None
    try:
        number = math.nan if isinstance(value, bool) else float(value)  # float(True) would be 1 row
    except (TypeError, ValueError):
        number = math.nan
    if not number.is_integer():  # also NaN and inf
        raise ValueError(f"{key}={value!r}: must be a whole number of rows >= 1, or null for all")
    if number < 1:
        raise ValueError(f"{key}={value!r}: must be >= 1 (a number of rows), or null for all")
    return int(number)


class SplitDataModule(L.LightningDataModule):
    """What every msl-rec data module shares (the LLM's :class:`RecDataModule`, the sequential models'
    :class:`~msl_rec.data.sequences.SequenceDataModule`): the BIGRec CSVs of ``dataset_cfg`` read and their
    rows selected (``train_subset`` / ``sample`` / ``valid_subset`` / ``test_subset``, checked before any file
    is read), the seeded train order (:class:`EpochShuffleSampler`), the loaders, and the evaluation interface
    (``eval_samples``, ``eval_lengths``, ``eval_dataloader``, ``train_targets``). A subclass turns a split's
    samples into its dataset (:meth:`make_dataset`) and says what a row's length is (:meth:`row_lengths`).
    """

    def __init__(self, dataset_cfg, catalog, collator, micro_batch_size: int, eval_batch_size: int,
                 train_subset: int | None = None, valid_subset: int | None = None, test_subset: int | None = None,
                 sample: int | None = None, seed: int = 0, num_workers: int = 0):
        super().__init__()
        if micro_batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"data.micro_batch_size={micro_batch_size}, data.eval_batch_size={eval_batch_size}: "
                             "both must be >= 1")
        # checked here, before any file is read: each names its key
        train_subset, valid_subset, test_subset, sample = (
            row_count(f"data.{key}", value) for key, value in (("train_subset", train_subset),
                                                              ("valid_subset", valid_subset),
                                                              ("test_subset", test_subset), ("sample", sample)))
        if sample is not None and train_subset is not None:
            raise ValueError(f"data.sample={sample} (random rows) and data.train_subset={train_subset} (first rows) "
                             "both select train rows; set one of them to null")
        self.cfg, self.catalog, self.collator = dataset_cfg, catalog, collator
        self.micro_batch_size, self.eval_batch_size = micro_batch_size, eval_batch_size
        self.subsets = {"train": train_subset, "valid": valid_subset, "test": test_subset}
        self.sample, self.seed, self.num_workers = sample, seed, num_workers
        self.datasets: dict[str, Dataset] = {}
        self.train_targets: list[int] = []
        self._train_sampler: EpochShuffleSampler | None = None

    # ---------------------------------------------------------------- what a subclass provides
    def make_dataset(self, split: str, samples: list[Sample]) -> Dataset:
        """The dataset of ``split``'s selected rows (item ``i`` is row ``i``); it has ``set_epoch`` and ``epoch``."""
        raise NotImplementedError

    def row_lengths(self, split: str) -> list[int] | None:
        """Per row of ``split``, its length (train: bucketing, None for none; eval: batching similar users)."""
        raise NotImplementedError

    def split_samples(self, split: str) -> list[Sample]:
        """The rows of ``split``'s dataset (user, history, target), in file order."""
        raise NotImplementedError

    # ---------------------------------------------------------------- splits
    def _load(self, split: str) -> Dataset | None:
        if split in self.datasets:
            return self.datasets[split]
        path = dataset_file(self.cfg, f"{split}_file")  # a missing file: an error saying how to build it
        if path is None:
            return None
        samples = read_samples(path, self.catalog.titles)
        if self.subsets[split] is not None:
            samples = samples[: self.subsets[split]]
        if split == "train" and self.sample is not None:
            samples = sample_rows(samples, self.sample, self.seed, path)
        self.datasets[split] = self.make_dataset(split, samples)
        return self.datasets[split]

    def _require(self, split: str) -> Dataset:
        ds = self._load(split)
        if ds is None:
            raise ValueError(f"dataset.{split}_file is null; no {split} rows")
        return ds

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            train = self._load("train")
            self.train_targets = [s.target for s in self.split_samples("train")] if train is not None else []
        if stage in (None, "fit", "validate"):
            self._load("valid")
        if stage in (None, "test"):
            self._load("test")

    def set_epoch(self, epoch: int) -> None:
        """The train order (and an LLM's negatives) of ``epoch``."""
        if "train" in self.datasets:
            self.datasets["train"].set_epoch(epoch)
        if self._train_sampler is not None:
            self._train_sampler.epoch = int(epoch)

    # ---------------------------------------------------------------- the evaluation interface
    def eval_samples(self, split: str) -> list[Sample]:
        """The split's rows (user, history, target), in file order (the evaluation keys rows by them)."""
        self._require(split)
        return self.split_samples(split)

    def eval_lengths(self, split: str) -> list[int]:
        """Per row its length (evaluation batches users of similar length)."""
        self._require(split)
        return self.row_lengths(split)

    # ---------------------------------------------------------------- loaders
    def _loader(self, split: str, batch_size: int, sampler=None, rows: Sequence[int] | None = None) -> DataLoader:
        ds = self._require(split)
        if rows is not None:
            ds = Subset(ds, rows)
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=self.collator,
                          num_workers=self.num_workers)

    def eval_dataloader(self, split: str, rows: Sequence[int] | None = None) -> DataLoader:
        """``valid``/``test`` batches of ``eval_batch_size`` in file order, only ``rows`` if given."""
        return self._loader(split, self.eval_batch_size, rows=rows)

    def train_dataloader(self) -> DataLoader:
        ds = self._require("train")
        trainer = self.trainer  # set by Lightning; None when used on its own
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        self._train_sampler = EpochShuffleSampler(ds, self.seed, self.train_lengths(), self.micro_batch_size,
                                                  num_replicas=replicas, rank=rank)
        self._train_sampler.set_epoch(ds.epoch)
        return self._loader("train", self.micro_batch_size, self._train_sampler)

    def train_lengths(self) -> list[int] | None:
        """Per train row, what micro-batches are bucketed by; None: no bucketing."""
        return None

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)


class RecDataModule(SplitDataModule):
    """Train/valid/test dataloaders over BIGRec CSVs.

    Args:
        dataset_cfg: the ``dataset`` config (``train_file``, ``valid_file``, ``test_file`` (may be
            null), ``instruction``, ``input_prefix``, ``cutoff_len``).
        tokenizer: the backbone's tokenizer (fast; one batch call per split at setup).
        catalog: the :class:`ItemCatalog` built from ``dataset_cfg.item_file`` with this tokenizer.
        micro_batch_size: train batch size; eval_batch_size: valid/test batch size.
        train_subset, valid_subset, test_subset: keep only the FIRST N >= 1 rows of that file (file
            order, so the same rows every run); None keeps all.
        sample: keep N >= 1 rows of the train file drawn at random with ``seed`` (the paper's
            ``--sample 10000``), in file order; None keeps all. Not together with ``train_subset``.
        bucket_by_length: group train micro-batches by length (see :class:`EpochShuffleSampler`).
        builder: the prompt builder (a hybrid method's :class:`SlotPromptBuilder`); None: BIGRec's prompt.
        num_negatives: negatives per train sample (0: no ``neg_*`` keys). Valid/test carry none.
        fixed_negatives: draw epoch 0's negatives every epoch.
        seed: seeds the train shuffle and the negatives.
        num_workers: DataLoader workers (not persistent, so each epoch sees the current epoch).

    Attributes:
        train_targets: target item id of every train row (after ``train_subset``), for popularity.
    """

    def __init__(self, dataset_cfg, tokenizer, catalog: ItemCatalog, micro_batch_size: int = 4,
                 eval_batch_size: int = 8, train_subset: int | None = None, valid_subset: int | None = None,
                 test_subset: int | None = None, num_negatives: int = 0, fixed_negatives: bool = False,
                 seed: int = 0, num_workers: int = 0, sample: int | None = None, bucket_by_length: bool = True,
                 builder: PromptBuilder | None = None):
        if num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0 (got {num_negatives})")
        super().__init__(dataset_cfg, catalog, Collator(catalog, pad_id_of(tokenizer, catalog)), micro_batch_size,
                         eval_batch_size, train_subset, valid_subset, test_subset, sample, seed, num_workers)
        self.tokenizer = tokenizer
        self.bucket_by_length = bool(bucket_by_length)
        self.num_negatives = num_negatives
        self.fixed_negatives = fixed_negatives
        # a hybrid method's builder writes slot ids too (SlotPromptBuilder); BIGRec's by default
        self.builder = builder or PromptBuilder.from_config(dataset_cfg, tokenizer, catalog.titles)

    def make_dataset(self, split: str, samples: list[Sample]) -> RecDataset:
        negs = self.num_negatives if split == "train" else 0
        return RecDataset(encode_samples(samples, self.builder, self.catalog), self.catalog, negs,
                          self.fixed_negatives, self.seed)

    def split_samples(self, split: str) -> list[Sample]:
        return [e.sample for e in self.datasets[split].encoded]

    def row_lengths(self, split: str) -> list[int]:
        """Prompt tokens per row."""
        return [len(e.prompt_ids) for e in self.datasets[split].encoded]

    def train_lengths(self) -> list[int] | None:
        """Prompt + response tokens per train row (bucketing), None without ``bucket_by_length``."""
        ds = self.datasets["train"]
        return [len(e.prompt_ids) + len(e.response_ids) for e in ds.encoded] if self.bucket_by_length else None

    @property
    def prompt_preamble(self) -> list[int]:
        """The token ids every prompt starts with (:meth:`PromptBuilder.preamble_ids`): evaluation
        computes their KV once and starts each prompt from it."""
        return self.builder.preamble_ids()
