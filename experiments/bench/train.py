"""Training throughput on CPU: the project's response-only path vs full-vocabulary logits.

    python -m experiments.bench.train [--steps 4] [--micro-batch 2] [--backbone smollm2_135m]

SmolLM2-135M with LoRA (q, v), Books prompts. Each method runs the same batches: 1 warm-up step,
then ``--steps`` timed steps (forward, backward, AdamW step). Methods:

- ``hf_full``: ``model(input_ids, attention_mask, labels=labels).loss`` -- lm_head over every position
  (how the paper's code trains, via the HF Trainer);
- ``lml`` / ``msl``: :class:`RecLitModule`'s path -- final hidden states, lm_head rows only at the
  response positions, then the loss.

Prints tokens/s per method and the ratios against ``hf_full``. Then the padding comparison: MSL over
the same ``--pad-rows`` rows as one epoch, in micro-batches of 4 drawn in the seeded random order
(``data.bucket_by_length=false``, the old path) and length-bucketed (the default): the padding
fraction of each and non-padding tokens/s over the whole epoch. bf16 is used only where the CPU has
native bf16 (``msl_rec.utils.precision``); the line says which.
"""

from __future__ import annotations

import argparse
import time

import torch
from omegaconf import OmegaConf

from msl_rec.utils.config import CONFIG_DIR


def batches(backbone_cfg, n: int, micro_batch: int, bucket_by_length: bool = True, rows: int | None = None):
    from msl_rec.data.catalog import ItemCatalog
    from msl_rec.data.datamodule import RecDataModule
    from msl_rec.data.tokenizers import load_tokenizer

    dataset = OmegaConf.load(f"{CONFIG_DIR}/dataset/books.yaml")
    dataset.root = f"{CONFIG_DIR}/../data/books"
    tok = load_tokenizer(backbone_cfg["tokenizer"])
    catalog = ItemCatalog.from_file(dataset.item_file, tok, allow_empty_titles=True)
    dm = RecDataModule(dataset, tok, catalog, micro_batch_size=micro_batch, train_subset=rows or n * micro_batch,
                       bucket_by_length=bucket_by_length)
    dm.setup("fit")
    return list(dm.train_dataloader())[:n]


def padding(data) -> float:
    """Pad tokens / all tokens over the batches."""
    return 1 - sum(int(b["attention_mask"].sum()) for b in data) / sum(b["attention_mask"].numel() for b in data)


def run(step, params, data, steps: int) -> float:
    opt = torch.optim.AdamW(params, lr=1e-4)

    def one(b):
        opt.zero_grad(set_to_none=True)
        step(b).backward()
        opt.step()

    one(data[0])  # warm-up
    tokens, t0 = 0, time.perf_counter()
    for b in data[1 : steps + 1]:
        one(b)
        tokens += int(b["attention_mask"].sum())
    return tokens / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--backbone", default="smollm2_135m")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--pad-rows", type=int, default=48, help="rows of the bucketed vs unbucketed epoch (0: skip)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from msl_rec.training.module import RecLitModule

    backbone = OmegaConf.to_container(OmegaConf.load(f"{CONFIG_DIR}/backbone/{args.backbone}.yaml"))
    backbone["lora"]["dropout"] = 0.0
    data = batches(backbone, args.steps + 1, args.micro_batch)
    losses = {name: OmegaConf.to_container(OmegaConf.load(f"{CONFIG_DIR}/loss/{name}.yaml"))
              for name in ("lml", "msl")}
    base = RecLitModule(backbone, losses["lml"])
    base.configure_model()
    model = base.model
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]

    def hf_full(b):
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss

    results = {"hf_full": run(hf_full, params, data, args.steps)}
    print(f"  hf_full  {results['hf_full']:8.1f} tokens/s", flush=True)
    for name, loss_cfg in losses.items():
        module = RecLitModule(backbone, loss_cfg)
        module.model = model  # share the one backbone

        def ours(b, module=module):
            loss, _ = module.loss(module.response_batch(b))
            return loss

        results[name] = run(ours, params, data, args.steps)
        print(f"  {name:8s} {results[name]:8.1f} tokens/s", flush=True)

    tokens = sum(int(b["attention_mask"].sum()) for b in data[1:]) / args.steps
    print(f"{args.backbone}, LoRA q,v, micro-batch {args.micro_batch}, ~{tokens:.0f} tokens/step, "
          f"{args.steps} timed steps, {torch.get_num_threads()} threads")
    for name, tps in results.items():
        print(f"  {name:8s} {tps:8.1f} tokens/s   x{tps / results['hf_full']:.2f} vs hf_full")
    if args.pad_rows:
        bucket_vs_random(backbone, losses["msl"], model, params, args.pad_rows)


def bucket_vs_random(backbone, loss_cfg, model, params, rows: int) -> None:
    """One epoch over the same rows, micro-batch 4: seeded random order vs length buckets."""
    from msl_rec.training.module import RecLitModule
    from msl_rec.utils.precision import cpu_supports_bf16

    module = RecLitModule(backbone, loss_cfg)
    module.model = model

    def step(b):
        loss, _ = module.loss(module.response_batch(b))
        return loss

    n = rows // 4
    rates = {}
    for name, bucket in (("random", False), ("bucketed", True)):
        data = batches(backbone, n, 4, bucket_by_length=bucket, rows=rows)
        rates[name] = run(step, params, [data[0], *data], n)  # warm-up on the first batch, then the epoch
        print(f"  msl {name:9s} epoch of {rows} rows: padding {padding(data):.1%}, {rates[name]:7.1f} tokens/s",
              flush=True)
    print(f"  bucketed / random: x{rates['bucketed'] / rates['random']:.2f} non-padding tokens/s "
          f"(fp32; CPU native bf16: {cpu_supports_bf16()}, so bf16-mixed is {'on' if cpu_supports_bf16() else 'off'} by default)")


if __name__ == "__main__":
    main()
