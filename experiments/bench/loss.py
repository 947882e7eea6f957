"""Loss-head cost: the project's MSL path vs the paper code's dense path, at LLaMA-3 vocabulary size.

    python -m experiments.bench.loss                 # LLaMA-3-8B size (hidden 4096): ~10 min on 2 CPU cores
    python -m experiments.bench.loss --hidden 512    # quicker; the time ratio barely depends on it

A batch of 8 sequences of 300 tokens whose last positions predict a Books response (title + EOS,
valid sets from the real Books trie). Forward + backward of the loss head down to the hidden
states; the output embedding (V = 128,256) is frozen, as a frozen lm_head is.

  msl:       response positions only, valid ids only (msl_loss_from_hidden)
  paper:     full-vocabulary logits at all 8 x 300 positions, response slice, dense mask, -inf fill,
             log_softmax (what the released MSL code does on top of the HF forward)
  lml_resp:  LML over the response positions only (this project)
  lml_all:   LML with full logits at every position, prompt labels ignored (HF default)

Each variant runs in its own subprocess; peak memory = max RSS minus the RSS measured in that
process after the inputs exist. Time = median over reps. The matmul cost of both paths scales
with the hidden size, so the time ratio barely depends on ``--hidden``; memory does not at all.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from msl_rec.losses.functional import lml_loss, msl_loss_from_hidden

ROOT = Path(__file__).resolve().parents[2]
VOCAB, BATCH, SEQ_LEN = 128_256, 8, 300
VARIANTS = ("msl", "paper", "lml_resp", "lml_all")
HEAVY = ("paper", "lml_all")


def build_inputs(path: Path) -> None:
    """Response tokens and valid sets of 8 Books targets, saved for the variant subprocesses."""
    from msl_rec.data.catalog import ItemCatalog
    from msl_rec.data.tokenizers import load_llama3_tokenizer

    catalog = ItemCatalog.from_file(ROOT / "data/books/id2name4Rec.json", load_llama3_tokenizer(),
                                    allow_empty_titles=True)
    targets = []
    with open(ROOT / "data/books/train_sample.csv") as f:
        for row in csv.DictReader(f):
            item = json.loads(row["item_ids"])[-1]
            if item in catalog.item_seq and item not in targets:
                targets.append(item)
            if len(targets) == BATCH:
                break
    valid = catalog.valid_id_tensor(targets)  # (B, P, K)
    labels = [torch.tensor(catalog.response_ids(t)) for t in targets]
    torch.save({"valid": valid, "labels": labels}, path)


def _rss_mb() -> float:
    """Max RSS so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    """Current RSS: the baseline, so earlier peaks (imports, loading) cannot hide a small variant."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_variant(name: str, inputs: Path, hidden_size: int, reps: int) -> dict:
    data = torch.load(inputs)
    lengths = [len(lab) for lab in data["labels"]]
    valid = torch.cat([data["valid"][b, :n] for b, n in enumerate(lengths)])  # (N, K)
    labels = torch.cat(data["labels"])
    # position t predicts token t + 1: the response's n tokens are predicted by positions T-n-1 .. T-2
    pos = torch.cat([b * SEQ_LEN + torch.arange(SEQ_LEN - n - 1, SEQ_LEN - 1) for b, n in enumerate(lengths)])
    g = torch.Generator().manual_seed(0)
    # filled in place: a temporary would raise max RSS above the baseline and hide small peaks
    weight = torch.empty(VOCAB, hidden_size).normal_(0, hidden_size ** -0.5, generator=g)  # frozen lm_head
    hidden = torch.empty(BATCH, SEQ_LEN, hidden_size).normal_(generator=g).requires_grad_(True)
    base = _current_rss_mb()

    def step() -> torch.Tensor:
        flat = hidden.view(-1, hidden_size)
        if name == "msl":
            loss = msl_loss_from_hidden(flat[pos], weight, labels, valid)
        elif name == "lml_resp":
            loss = lml_loss(flat[pos] @ weight.T, labels)
        elif name == "lml_all":
            all_labels = torch.full((BATCH * SEQ_LEN,), -100, dtype=torch.long)
            all_labels[pos] = labels
            loss = F.cross_entropy(flat @ weight.T, all_labels, ignore_index=-100)
        else:  # paper
            logits = (flat @ weight.T)[pos]
            mask = torch.zeros_like(logits, dtype=torch.bool)
            mask.scatter_(1, valid.clamp_min(0), valid >= 0)  # pads write False at column 0
            mask.scatter_(1, valid[:, :1], True)  # every row's first id is real
            logp = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
            nll = -logp.gather(1, labels[:, None]).squeeze(1)
            multi = mask.sum(1) > 1
            loss = nll[multi].mean()
        loss.backward()
        hidden.grad = None
        return loss.detach()

    times = []
    for _ in range(reps):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
    return {"loss": loss.item(), "time_s": statistics.median(times), "peak_mb": _rss_mb() - base,
            "positions": len(labels), "union": int(torch.unique(valid[valid >= 0]).numel())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size (LLaMA-3-8B: 4096; smaller runs faster)")
    parser.add_argument("--reps", type=int, default=5, help="reps of the light variants")
    parser.add_argument("--heavy-reps", type=int, default=1, help="reps of the full-logit variants")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.variant:
        reps = args.heavy_reps if args.variant in HEAVY else args.reps
        print(json.dumps(run_variant(args.variant, args.inputs, args.hidden, reps)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs.pt"
        build_inputs(inputs)
        res = {}
        for v in VARIANTS:
            out = subprocess.run([sys.executable, "-m", "experiments.bench.loss", "--variant", v,
                                  "--inputs", str(inputs), "--hidden", str(args.hidden), "--reps", str(args.reps),
                                  "--heavy-reps", str(args.heavy_reps)],
                                 cwd=ROOT, check=True, capture_output=True, text=True).stdout
            res[v] = json.loads(out.strip().splitlines()[-1])
            print(f"{v:9s} loss={res[v]['loss']:.6f} time={res[v]['time_s'] * 1e3:9.1f} ms "
                  f"peak={res[v]['peak_mb']:8.1f} MB", flush=True)
    r = res["msl"]
    print(f"V={VOCAB} d={args.hidden} batch={BATCH}x{SEQ_LEN} response positions={r['positions']} "
          f"union of valid ids={r['union']}")
    for fast, slow, label in (("msl", "paper", "msl_vs_paper"), ("lml_resp", "lml_all", "lml_resp_vs_all")):
        a, b = res[fast], res[slow]
        print(f"{label}: time {b['time_s'] / a['time_s']:.1f}x lower, "
              f"peak memory {b['peak_mb'] / max(a['peak_mb'], 1.0):.1f}x lower, "
              f"|dloss|={abs(a['loss'] - b['loss']):.1e}")


if __name__ == "__main__":
    main()
