"""SASRec throughput on this machine: training examples/s and evaluation users/s, on Books.

    python -m experiments.bench.sequential [--epochs 1] [--users 3472] [--threads 2]

Training: the released SASRec (configs/model/sasrec.yaml) with its BCE loss, Adam, batches of 256 windows of
the full ``train.csv`` in the seeded order of ``method=sasrec``; one warm-up batch, then ``--epochs`` timed
epochs (forward, backward, step). Evaluation: ``decoder=item_scores`` over ``--users`` validation users, as
``msl-rec-eval`` ranks them (:class:`~msl_rec.evaluation.predict.BatchPredictor`: each user scored on its own,
so rankings do not depend on the batch), against one batched forward of the same users (what a batch-dependent
ranker would cost); the ratio is the price of batch invariance. The ranked lists of both are compared.
"""

from __future__ import annotations

import argparse
import time

import torch
from omegaconf import OmegaConf

from msl_rec.data.sequences import SequenceDataModule, TitleCatalog
from msl_rec.decoding.scores import ItemScoreRanker
from msl_rec.evaluation.predict import BatchPredictor
from msl_rec.losses import BCELoss
from msl_rec.models import SASRec
from msl_rec.utils.config import CONFIG_DIR


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--users", type=int, default=3472)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    dataset = OmegaConf.load(f"{CONFIG_DIR}/dataset/books.yaml")
    dataset.root = f"{CONFIG_DIR}/../data/books"
    dataset.train_file = f"{dataset.root}/train.csv"  # method=sasrec's: the whole train split
    catalog = TitleCatalog.from_file(dataset.item_file, allow_empty_titles=True)
    dm = SequenceDataModule(dataset, catalog, max_len=10, micro_batch_size=256, eval_batch_size=256,
                            valid_subset=args.users)
    dm.setup("fit")
    model, loss = SASRec(catalog.num_items), BCELoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6)

    def step(batch) -> None:
        opt.zero_grad(set_to_none=True)
        scores, targets = model.train_scores(batch)
        loss(scores, targets)[0].backward()
        opt.step()

    batches = list(dm.train_dataloader())
    model.train()
    step(batches[0])  # warm-up
    n, t0 = 0, time.perf_counter()
    for _ in range(args.epochs):
        for b in batches:
            step(b)
            n += len(b["targets"])
    train_s = time.perf_counter() - t0
    print(f"SASRec training ({args.threads} threads, float32): {n} windows in {train_s:.2f} s = "
          f"{n / train_s:,.0f} examples/s ({len(batches)} batches of <= 256 per epoch, {args.epochs} epoch(s))")

    model.eval()
    predictor = BatchPredictor(ItemScoreRanker(catalog, top_k=(1, 5, 10)), catalog)
    valid = list(dm.eval_dataloader("valid"))
    t0 = time.perf_counter()
    rows = [r for b in valid for r in predictor.predict(model, b)]
    eval_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        batched = [model(b["history"], b["lengths"]) for b in valid]
    batched_s = time.perf_counter() - t0
    group = torch.as_tensor(catalog.item_group)
    batched_lists = []
    for scores in batched:
        g = scores.new_full((len(scores), catalog.num_groups), float("-inf"))
        g = g.scatter_reduce(1, group.expand_as(scores), scores, reduce="amax")
        batched_lists += [[list(catalog.seq_items[s]) for s in o.tolist()]
                          for o in torch.sort(g, dim=1, descending=True, stable=True)[1][:, :10]]
    same = sum(r["ranked_ids"] == lst for r, lst in zip(rows, batched_lists))
    print(f"SASRec evaluation, {len(rows)} users, full catalog ({catalog.num_groups} titles): "
          f"{len(rows) / eval_s:,.0f} users/s per-user scoring (msl-rec-eval's) vs {len(rows) / batched_s:,.0f} users/s "
          f"one batched forward: ratio {eval_s / batched_s:.1f}x; top-10 lists identical for {same}/{len(rows)} users")


if __name__ == "__main__":
    main()
