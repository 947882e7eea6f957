import re
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DistributedSampler

from msl_rec.data.catalog import ItemCatalog
from msl_rec.data.datamodule import BATCH_KEYS, IGNORE_INDEX, NEGATIVE_KEYS, RecDataModule, sample_rows
from msl_rec.data.errors import DataError
from msl_rec.data.io import read_samples
from msl_rec.data.tokenizers import load_gguf_tokenizer
from msl_rec.utils.config import CONFIG_DIR


@pytest.fixture(scope="module")
def cfg():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("stats", overrides=["dataset=books", "backbone=smollm2_135m"])


@pytest.fixture(scope="module")
def tokenizer():
    return load_gguf_tokenizer()


@pytest.fixture(scope="module")
def catalog(cfg, tokenizer):
    return ItemCatalog.from_file(cfg.dataset.item_file, tokenizer, allow_empty_titles=True)


def make_dm(cfg, tokenizer, catalog, **kw):
    kw = {"micro_batch_size": 4, "eval_batch_size": 3, "train_subset": 12, "valid_subset": 5, **kw}
    dm = RecDataModule(cfg.dataset, tokenizer, catalog, **kw)
    dm.setup("fit")
    return dm


def check_rows(catalog, input_ids, attention_mask, labels, items, prompts=None):
    for b, item in enumerate(items):
        resp = catalog.response_ids(item)
        n = int(attention_mask[b].sum())
        assert attention_mask[b, -n:].all() and not attention_mask[b, :-n].any()  # left-padded
        assert labels[b, -len(resp):].tolist() == resp
        assert (labels[b, : -len(resp)] == IGNORE_INDEX).all()
        assert input_ids[b, -len(resp):].tolist() == resp
        if prompts is not None:
            assert input_ids[b, -n:-len(resp)].tolist() == prompts[b]


def test_train_batch_contract(cfg, tokenizer, catalog):
    dm = make_dm(cfg, tokenizer, catalog)
    assert len(dm.train_targets) == 12
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == set(BATCH_KEYS)
    assert all(v.dtype == torch.long for v in batch.values())
    B, T = batch["input_ids"].shape
    assert B == 4 and batch["attention_mask"].shape == batch["labels"].shape == (B, T)
    targets = batch["target_ids"].tolist()
    assert batch["valid_ids"].equal(catalog.valid_id_tensor(targets))
    assert batch["response_len"].tolist() == [len(catalog.response_ids(t)) for t in targets]
    pm = batch["prompt_attention_mask"]
    prompts = [batch["prompt_input_ids"][b, -int(pm[b].sum()):].tolist() for b in range(B)]
    check_rows(catalog, batch["input_ids"], batch["attention_mask"], batch["labels"], targets, prompts)
    # the prompt is the Alpaca text of this user's history, tokenised on its own
    by_target = {s.sample.target: s for s in dm.datasets["train"].encoded}
    enc = by_target[targets[0]]
    assert prompts[0] == tokenizer(dm.builder.text(enc.sample.history))["input_ids"]
    assert batch["user_ids"][0].item() == enc.sample.user_id


def test_valid_first_rows_in_file_order(cfg, tokenizer, catalog):
    dm = make_dm(cfg, tokenizer, catalog)
    batches = list(dm.val_dataloader())
    assert [b["input_ids"].shape[0] for b in batches] == [3, 2]
    first = read_samples(cfg.dataset.valid_file)[:5]
    assert torch.cat([b["target_ids"] for b in batches]).tolist() == [s.target for s in first]
    assert "neg_input_ids" not in batches[0]
    with pytest.raises(ValueError, match="test_file is null"):
        dm.test_dataloader()


def test_train_shuffle_is_seeded(cfg, tokenizer, catalog):
    order = lambda dm: [t for b in dm.train_dataloader() for t in b["target_ids"].tolist()]
    a, b = order(make_dm(cfg, tokenizer, catalog, seed=1)), order(make_dm(cfg, tokenizer, catalog, seed=1))
    assert a == b and sorted(a) == sorted(make_dm(cfg, tokenizer, catalog).train_targets)


def negatives_by_target(dm, epoch):
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)  # what Lightning does before each epoch
    out = {}
    for batch in loader:
        for b, t in enumerate(batch["target_ids"].tolist()):
            out[(batch["user_ids"][b].item(), t)] = batch["neg_item_ids"][b].tolist()
    return out, batch


def test_negatives(cfg, tokenizer, catalog):
    n = 3
    dm = make_dm(cfg, tokenizer, catalog, num_negatives=n)
    e0, batch = negatives_by_target(dm, 0)
    assert set(batch) == set(BATCH_KEYS) | set(NEGATIVE_KEYS)
    B = batch["input_ids"].shape[0]
    assert batch["neg_item_ids"].shape == (B, n) and batch["neg_input_ids"].shape[0] == B * n
    neg_items = batch["neg_item_ids"].flatten().tolist()  # sample-major: row b*n+j
    check_rows(catalog, batch["neg_input_ids"], batch["neg_attention_mask"], batch["neg_labels"], neg_items)
    for s in dm.datasets["train"].encoded:
        negs = e0[(s.sample.user_id, s.sample.target)]
        target_seq = catalog.item_seq[s.sample.target]
        assert len(set(negs)) == n
        assert not set(negs) & set(s.sample.item_ids)
        assert all(catalog.item_seq[i] != target_seq for i in negs)
    assert negatives_by_target(dm, 0)[0] == e0   # same epoch, same draws
    assert negatives_by_target(dm, 1)[0] != e0   # redrawn next epoch
    dm.set_epoch(1)
    assert dm.datasets["train"].epoch == 1
    fixed = make_dm(cfg, tokenizer, catalog, num_negatives=n, fixed_negatives=True)
    assert negatives_by_target(fixed, 0)[0] == negatives_by_target(fixed, 5)[0] == e0


def padding_fraction(loader) -> float:
    pads = total = 0
    for batch in loader:
        mask = batch["attention_mask"]
        pads, total = pads + int((mask == 0).sum()), total + mask.numel()
    return pads / total


def test_bucketing_lowers_padding_on_real_rows_and_keeps_every_row(cfg, tokenizer, catalog):
    bucketed = make_dm(cfg, tokenizer, catalog, train_subset=400)
    plain = make_dm(cfg, tokenizer, catalog, train_subset=400, bucket_by_length=False)
    rows = lambda dm: sorted(t for b in dm.train_dataloader() for t in b["user_ids"].tolist())
    assert rows(bucketed) == rows(plain) == sorted(e.sample.user_id for e in plain.datasets["train"].encoded)
    after, before = padding_fraction(bucketed.train_dataloader()), padding_fraction(plain.train_dataloader())
    assert after < 0.5 * before


def test_sample_draws_seeded_random_rows(cfg, tokenizer, catalog):
    rows = read_samples(cfg.dataset.train_file)
    a, b, c = sample_rows(rows, 50, 1), sample_rows(rows, 50, 1), sample_rows(rows, 50, 2)
    assert a == b and a != c and len(set(map(id, a))) == 50
    assert [rows.index(s) for s in a] == sorted(rows.index(s) for s in a) != list(range(50))  # file order, not first N
    with pytest.raises(DataError, match=rf"train_sample.csv: data.sample={len(rows) + 1} but the file has only "
                                        rf"{len(rows)} rows"):
        make_dm(cfg, tokenizer, catalog, train_subset=None, sample=len(rows) + 1)
    dm = make_dm(cfg, tokenizer, catalog, train_subset=None, sample=20, seed=7)
    assert [e.sample for e in dm.datasets["train"].encoded] == sample_rows(rows, 20, 7)
    assert dm.train_targets == [s.target for s in sample_rows(rows, 20, 7)]
    with pytest.raises(ValueError, match="data.sample=20 .* and data.train_subset=12 .* set one of them to null"):
        make_dm(cfg, tokenizer, catalog, sample=20)


def test_train_sampler_under_ddp_takes_this_ranks_share(cfg, tokenizer, catalog):
    """Under a (fake) 2-process trainer each rank's loader holds its own half; Lightning leaves a
    DistributedSampler in place instead of wrapping it again."""

    shares = []
    for rank in (0, 1):
        dm = make_dm(cfg, tokenizer, catalog, train_subset=30)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, DistributedSampler)
        shares.append([i for i in loader.sampler])
    assert len(shares[0]) == len(shares[1]) == 15 and not set(shares[0]) & set(shares[1])
    assert set(shares[0]) | set(shares[1]) == set(range(30))


@pytest.mark.parametrize("key,value,says", [
    ("train_subset", 0, "must be >= 1"),
    ("train_subset", -3, "must be >= 1"),  # rows[:-3] used to drop the last 3 rows silently
    ("valid_subset", 0, "must be >= 1"),
    ("test_subset", -1, "must be >= 1"),
    ("sample", 0, "must be >= 1"),
    ("valid_subset", 2.5, "must be a whole number"),
    ("valid_subset", "abc", "must be a whole number"),
    ("sample", True, "must be a whole number"),
])
def test_row_counts_below_one_are_an_error_naming_the_key(cfg, tokenizer, catalog, key, value, says):
    kw = {"train_subset": None} if key == "sample" else {}
    with pytest.raises(ValueError, match=re.escape(f"data.{key}={value!r}: {says}")):
        RecDataModule(cfg.dataset, tokenizer, catalog, **{**kw, key: value})


def test_row_counts_as_whole_floats_are_kept(cfg, tokenizer, catalog):
    dm = make_dm(cfg, tokenizer, catalog, train_subset=6.0, valid_subset=None)
    assert len(dm.datasets["train"]) == 6 and dm.subsets == {"train": 6, "valid": None, "test": None}
