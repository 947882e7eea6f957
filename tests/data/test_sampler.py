"""The train sampler, checked by brute force: permutations, (seed, epoch) purity, DDP shares, buckets."""

import random

import pytest
import torch

from msl_rec.data.datamodule import EpochShuffleSampler


class _Rows:
    def __init__(self, n):
        self.n = n
        self.epoch = 0

    def __len__(self):
        return self.n

    def set_epoch(self, epoch):
        self.epoch = epoch


def lengths_of(n, seed=0):
    rng = random.Random(seed)
    return [rng.randint(20, 300) for _ in range(n)]


def order(n, seed=0, epoch=0, bucket=True, micro=4, replicas=1, rank=0, bucket_batches=5):
    s = EpochShuffleSampler(_Rows(n), seed, lengths_of(n) if bucket else None, micro, bucket_batches, replicas, rank)
    s.set_epoch(epoch)
    out = list(s)
    assert len(out) == len(s)
    return out


@pytest.mark.parametrize("bucket", [True, False])
@pytest.mark.parametrize("n", [1, 7, 64, 203])
def test_each_epoch_is_a_permutation_and_a_function_of_seed_and_epoch(n, bucket):
    for epoch in range(3):
        a = order(n, seed=3, epoch=epoch, bucket=bucket)
        assert sorted(a) == list(range(n))
        assert a == order(n, seed=3, epoch=epoch, bucket=bucket)
    if n > 7:
        assert order(n, 3, 0, bucket) != order(n, 3, 1, bucket) != order(n, 4, 1, bucket)


def test_unbucketed_single_process_is_the_seeded_randperm():
    g = torch.Generator().manual_seed(5 * 1_000_003 + 2)
    assert order(50, seed=5, epoch=2, bucket=False) == torch.randperm(50, generator=g).tolist()


@pytest.mark.parametrize("bucket", [True, False])
@pytest.mark.parametrize("n, replicas", [(203, 2), (203, 3), (64, 4), (5, 4)])
def test_ranks_are_equal_and_cover_every_row(n, replicas, bucket):
    micro = 4
    shares = [order(n, 1, 1, bucket, micro, replicas, r) for r in range(replicas)]
    per_rank = -(-n // replicas)  # DistributedSampler's ceil(n / replicas)
    assert all(len(s) == per_rank for s in shares)
    flat = [i for s in shares for i in s]
    assert set(flat) == set(range(n))
    assert len(flat) - n == per_rank * replicas - n < replicas  # only DistributedSampler's padding repeats


@pytest.mark.parametrize("bucket", [True, False])
@pytest.mark.parametrize("n, replicas", [(204, 2), (204, 3), (64, 4), (8, 4)])
def test_each_step_splits_one_global_batch_into_disjoint_rank_shares(n, replicas, bucket):
    """No padding (``n`` a multiple of ``replicas``): at optimizer step k the ranks' micro-batches are
    disjoint and together are exactly the single-process order's k-th batch of ``micro x replicas``
    rows, so every rank trains on rows of the same length bucket and the global order does not depend
    on the world size."""
    micro = 4
    shares = [order(n, 1, 1, bucket, micro, replicas, r) for r in range(replicas)]
    one_process = order(n, 1, 1, bucket, micro * replicas)
    steps = range(0, n // replicas, micro)
    assert len(steps) == -(-n // (micro * replicas))
    for k, start in enumerate(steps):
        parts = [s[start:start + micro] for s in shares]
        rows = [i for p in parts for i in p]
        assert len(set(rows)) == len(rows), (k, parts)  # disjoint
        global_batch = one_process[k * micro * replicas:(k + 1) * micro * replicas]
        assert sorted(rows) == sorted(global_batch), k


def test_micro_batches_are_length_sorted_within_mega_batches():
    n, micro, bb = 200, 4, 5
    lengths = lengths_of(n)
    a = order(n, 2, 0, True, micro, bucket_batches=bb)
    pad = lambda o: sum(max(lengths[i] for i in o[k:k + micro]) * len(o[k:k + micro]) - sum(lengths[i] for i in
                        o[k:k + micro]) for k in range(0, n, micro))
    # brute force: every micro-batch is a run of consecutive rows of some mega-batch sorted by length
    unbucketed = order(n, 2, 0, False, micro)
    megas = [sorted(unbucketed[a0:a0 + micro * bb], key=lambda i: -lengths[i]) for a0 in range(0, n, micro * bb)]
    runs = {tuple(m[k:k + micro]) for m in megas for k in range(0, len(m), micro)}
    assert {tuple(a[k:k + micro]) for k in range(0, n, micro)} == runs
    assert pad(a) < 0.35 * pad(unbucketed)  # 20-row mega-batches of uniform lengths: ~1/4


def test_resume_at_skips_the_done_positions_once():
    s = EpochShuffleSampler(_Rows(50), 1, lengths_of(50), 4, 5)
    full = list(s)
    s.resume_at(12)
    assert list(s) == full[12:] and list(s) == full
