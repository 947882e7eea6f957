"""Default ``msl-rec-eval`` time per user, before (a base commit) and now, measured in one run.

Both sides run the whole default evaluation process, model loading included, exactly as a user types it
(``msl-rec-eval ckpt_path=<adapter> subset=N``: SmolLM2, ``cbs_masked``, 10 beams, float32, the
default ``scoring``), on the same users, with the same committed adapter and thread count. The base
side runs from a git worktree of ``--base`` (default: the last commit before the one evaluation
pipeline, whose default also scored 99 sampled negatives and ran a second prompt forward for
``target_logp``). Then it checks that both sides agree user by user: the same ranked lists and ranks,
beam scores and ``target_logp`` within ``--tol``.

    python -m experiments.bench.eval_default --users 24 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE_REV = "8cf7261"  # main before issue 20: sampled rank on by default, target_logp by a second forward
ADAPTER = ROOT / "results" / "compare_cpu" / "msl.ckpt"


def worktree(rev: str, where: Path) -> Path:
    """A detached git worktree of ``rev`` (reused when it is already there)."""
    path = where / f"msl-rec-{rev}"
    if not (path / "msl_rec").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(path), rev],
                       check=True, capture_output=True)
    return path


def run_eval(code: Path, out: Path, users: int, threads: int, adapter: Path) -> float:
    """Wall seconds of one default evaluation process run from the source tree ``code``."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "msl_rec.eval", f"ckpt_path={adapter}", f"subset={users}",
           f"hydra.run.dir={out}", "resume=false"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=code, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} (in {code}) failed with {proc.returncode}:\n{proc.stderr[-3000:]}")
    return seconds


def read_rows(folder: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines() if line.strip()]
    return {int(r["user_id"]) * 1_000_000 + int(r["target_id"]): r for r in rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base", default=BASE_REV)
    ap.add_argument("--adapter", type=Path, default=ADAPTER)
    ap.add_argument("--tol", type=float, default=1e-4, help="largest accepted |score| / |target_logp| difference")
    args = ap.parse_args(argv)
    if not args.adapter.is_file():
        raise FileNotFoundError(f"--adapter {args.adapter}: no such checkpoint (the committed comparison's adapter)")
    tmp = Path(tempfile.mkdtemp(prefix="msl-bench-eval-"))
    base = worktree(args.base, Path(tempfile.gettempdir()))
    timing = {}
    for side, code in (("before", base), ("now", ROOT)):
        timing[side] = run_eval(code, tmp / side, args.users, args.threads, args.adapter.resolve())
        print(f"{side:>6} ({'base ' + args.base if side == 'before' else 'this tree'}): "
              f"{timing[side]:.1f} s for {args.users} users = {timing[side] / args.users:.2f} s/user "
              "(whole process, model loading included)", flush=True)
    before, now = read_rows(tmp / "before"), read_rows(tmp / "now")
    if before.keys() != now.keys():
        raise SystemExit(f"the two evaluations ranked different users: {sorted(before.keys() ^ now.keys())[:5]}")
    same_lists = sum(before[k]["ranked_ids"] == now[k]["ranked_ids"] and before[k]["rank"] == now[k]["rank"]
                     for k in before)
    score_diff = max((abs(a - b) for k in before for a, b in zip(before[k]["scores"], now[k]["scores"])), default=0.0)
    logp_diff = max(abs(before[k]["target_logp"] - now[k]["target_logp"]) for k in before)
    m_before = json.loads((tmp / "before" / "metrics.json").read_text())
    m_now = json.loads((tmp / "now" / "metrics.json").read_text())
    metric_keys = [k for k in m_now if k.startswith(("ndcg@", "hr@"))]
    metrics_equal = all(m_before[k] == m_now[k] for k in metric_keys)
    print(f"default evaluation speed-up: {timing['before'] / timing['now']:.2f}x per user "
          f"({timing['before'] / args.users:.2f} -> {timing['now'] / args.users:.2f} s/user, {args.threads} threads)")
    print(f"same ranked lists and ranks: {same_lists}/{len(before)} users; NDCG/HR equal: {metrics_equal}; "
          f"max |beam score diff| {score_diff:.2e}; max |target_logp diff| {logp_diff:.2e} "
          f"(mean target_logp {m_before['target_logp']:.6f} -> {m_now['target_logp']:.6f})")
    ok = same_lists == len(before) and metrics_equal and score_diff <= args.tol and logp_diff <= args.tol
    if not ok:
        print("MISMATCH: the default evaluation changed its results", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
