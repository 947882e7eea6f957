"""``make demo``: train MSL+ATS on SmolLM2 over a slice of Books, evaluate it, compare with popularity.

Runs the two console apps as a user would (``msl-rec-train experiment=demo``, then ``msl-rec-eval
decoder=popularity`` on the same validation users) and prints both metric rows with the run folder.
Extra arguments are passed to the train app as Hydra overrides, e.g. ``loss=lml``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
KEYS = ["ndcg@1", "ndcg@5", "ndcg@10", "hr@1", "hr@5", "hr@10"]


def run(app: str, overrides: list[str]) -> Path:
    """Run a Hydra app in a fresh folder under outputs/demo/ and return that folder."""
    run_dir = Path("outputs/demo") / f"{app.removeprefix('msl-rec-')}-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [str(BIN / app), *overrides, f"hydra.run.dir={run_dir}"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return run_dir


def main() -> None:
    t0 = time.time()
    train_dir = run("msl-rec-train", ["experiment=demo", *sys.argv[1:]])
    trained = json.loads((train_dir / "metrics.json").read_text())
    # the same validation users; popularity counts the whole training file, not the demo's slice
    pop_dir = run("msl-rec-eval", ["experiment=demo", "decoder=popularity", "data.train_subset=null"])
    popular = json.loads((pop_dir / "metrics.json").read_text())

    print("\n" + " " * 22 + "".join(f"{k:>9}" for k in KEYS))
    for name, m in (("MSL+ATS (SmolLM2)", trained), ("popularity", popular)):
        print(f"{name:<22}" + "".join(f"{m[k]:9.4f}" for k in KEYS))
    print(f"\nrun folder: {train_dir}\nmetrics: {train_dir / 'metrics.json'}"
          f"\nreport: python -m experiments.report {train_dir}\nwall time: {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
