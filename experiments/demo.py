"""``make demo``: does training teach SmolLM2 to recommend? Zero-shot vs trained on the same users.

Runs the console apps as a user would: ``msl-rec-train experiment=demo`` (MSL+ATS over a slice of
Books), then ``msl-rec-eval experiment=demo`` three times on the same validation users: the
zero-shot backbone, the trained checkpoint and the popularity baseline. Prints one table:

- ``target_logp``: mean log-likelihood of each user's target title (the sensitive signal: it moves
  long before NDCG does), with the paired 95% interval of trained minus zero-shot;
- NDCG/HR at 1, 10 next to popularity's;
- how many distinct titles each ranker puts first across the users (the untrained model puts one
  title first for almost everyone).

Extra arguments are Hydra overrides for every run, e.g. ``loss=lml`` or ``data.valid_subset=40``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from experiments.report import distinct_first, run_label, user_rows
from msl_rec.utils.config import PROJECT_ROOT

KEYS = ["ndcg@1", "ndcg@10", "hr@1", "hr@10"]


def run(module: str, overrides: list[str], name: str, stamp: str) -> tuple[Path, float]:
    """Run ``python -m <module>`` (a Hydra app) in outputs/demo/<stamp>/<name>; return (folder, seconds)."""
    run_dir = PROJECT_ROOT / "outputs" / "demo" / stamp / name
    cmd = [sys.executable, "-m", module, *overrides, f"hydra.run.dir={run_dir}"]
    print("$ python", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=PROJECT_ROOT)
    return run_dir, time.time() - t0


def logp_change(trained: Path, zero: Path) -> str:
    """Trained minus zero-shot target_logp per user, with its paired bootstrap interval."""
    from msl_rec.significance import compare_paired

    a, b = user_rows({"predictions": trained / "predictions.jsonl"}), user_rows({"predictions": zero / "predictions.jsonl"})
    rows = sorted(set(a) & set(b))
    if not rows or not all("target_logp" in a[i] and "target_logp" in b[i] for i in rows):
        return "target_logp: not in predictions.jsonl (this msl-rec-eval does not write it)"
    c = compare_paired([a[i]["target_logp"] for i in rows], [b[i]["target_logp"] for i in rows], "target_logp")
    return (f"target_logp trained - zero-shot: {c.diff:+.2f} nats per user, 95% CI [{c.ci_low:+.2f}, {c.ci_high:+.2f}] "
            f"over {c.n_users} users ({c.verdict.replace('model', 'trained')})")


def main() -> None:
    t0, stamp = time.time(), time.strftime("%Y%m%d-%H%M%S")
    extra = sys.argv[1:]
    train_dir, t_train = run("msl_rec.train", ["experiment=demo", *extra], "train", stamp)
    trained_dir, t_trained = run("msl_rec.eval", ["experiment=demo", *extra, f"run_dir={train_dir}"], "eval-trained", stamp)
    zero_dir, t_zero = run("msl_rec.eval", ["experiment=demo", *extra], "eval-zero-shot", stamp)
    # popularity counts the whole training file's targets, not the demo's slice
    pop_dir, t_pop = run("msl_rec.eval", ["experiment=demo", *extra, "decoder=popularity", "data.train_subset=null"],
                         "eval-popularity", stamp)

    cfg = yaml.safe_load((train_dir / ".hydra" / "config.yaml").read_text())
    rows = [(f"{run_label(cfg)}, {cfg['data']['train_subset']} rows", trained_dir, t_train + t_trained),
            ("zero-shot (untrained)", zero_dir, t_zero), ("popularity", pop_dir, t_pop)]
    users = len((zero_dir / "predictions.jsonl").read_text().splitlines())
    head = f"{'':<26}{'target_logp':>12}" + "".join(f"{k:>9}" for k in KEYS) + f"{'distinct #1':>13}{'wall s':>8}"
    print("\n" + f"{users} validation users (the same for every row)\n" + head)
    for name, folder, secs in rows:
        m = json.loads((folder / "metrics.json").read_text())
        logp = f"{m['target_logp']:12.2f}" if "target_logp" in m else f"{'n/a':>12}"
        first = distinct_first({"predictions": folder / "predictions.jsonl"})
        print(f"{name:<26}{logp}" + "".join(f"{m[k]:9.4f}" for k in KEYS) + f"{f'{first}/{users}':>13}{secs:8.0f}")
    print("\n" + logp_change(trained_dir, zero_dir))
    print(f"\nrun folders: {train_dir.parent}\nreport: python -m experiments.report {train_dir.parent}"
          f"\nwall time: {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
