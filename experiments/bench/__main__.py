"""``make bench``: every benchmark in turn, each in its own process; each prints its ratios.

``python -m experiments.bench [trie loss decode decode_speed eval_default train sequential]`` runs a subset.
"""

import subprocess
import sys
import time

BENCHES = ["trie", "loss", "decode", "decode_speed", "eval_default", "train", "sequential"]


def main() -> None:
    chosen = sys.argv[1:] or BENCHES
    for name in chosen:
        print(f"\n===== bench: {name} =====", flush=True)
        t0 = time.time()
        subprocess.run([sys.executable, "-m", f"experiments.bench.{name}"], check=True)
        print(f"(bench {name}: {time.time() - t0:.0f} s wall)", flush=True)


if __name__ == "__main__":
    main()
