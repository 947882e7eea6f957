"""Tables and plots from finished runs: ``python -m experiments.report <sweep or run dirs> [--out DIR]``.

A run folder is one that holds ``.hydra/config.yaml`` and ``metrics.json`` (written by the train
app: validation metrics of the checkpoint with the best NDCG@5, as the paper reports). Runs are
grouped by their loss label (``lml``, ``msl (tau=1.5)``, ``msl_ats`` ...); several seeds give
mean +- std. Writes into ``--out`` (default: the first folder given):

- ``results.md``: Table-5-style N@5, N@10, H@5, H@10 per loss with the relative improvement over
  LML, and Table-6/Fig-6-style NDCG@10 against tau when runs differ in tau;
- ``ndcg_vs_tau.png`` (Fig. 6), ``training_curves.png`` (loss and ATS tau over steps),
  ``w_distribution.png`` (Fig. 5: ``w = 1 - P_valid(y)`` per response position, LML vs MSL).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

COLUMNS = [("N@5", "ndcg@5"), ("N@10", "ndcg@10"), ("H@5", "hr@5"), ("H@10", "hr@10")]


def find_runs(roots: list[Path]) -> list[Path]:
    runs = []
    for root in roots:
        for cfg in sorted(root.rglob(".hydra/config.yaml")):
            run = cfg.parent.parent
            if (run / "metrics.json").is_file():
                runs.append(run)
    return runs


def run_label(cfg: dict) -> str:
    loss = cfg.get("loss", {})
    name = str(loss.get("_target_", "loss")).rsplit(".", 1)[-1]
    label = {"LMLLoss": "LML", "MSLLoss": "MSL", "MSLATSLoss": "MSL+ATS", "SDPOLoss": "S-DPO"}.get(name, name)
    tau = loss.get("tau")
    if tau is not None and label in ("LML", "MSL") and float(tau) != 1.0:
        label += f" (tau={float(tau):g})"
    if loss.get("alpha_mode"):
        label += " + alpha"
    return label


def load_run(run: Path) -> dict:
    """One run's config, final metrics, per-step log and w values.

    An ``msl-rec-eval run_dir=<train run>`` folder counts as that training run: its loss, seed and
    training curves come from the training folder, its metrics from the evaluation.
    """
    cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    source, label = run, None
    if cfg.get("run_dir"):
        source = Path(cfg["run_dir"])
        cfg = yaml.safe_load((source / ".hydra" / "config.yaml").read_text())
    elif "split" in cfg and not cfg.get("ckpt_path"):  # an eval of no trained model
        decoder = cfg.get("decoder", {}).get("name", "decoder")
        label = decoder if decoder in ("popularity", "random") else f"zero-shot ({decoder})"
    steps = []
    for path in sorted(source.rglob("metrics.csv")):
        with open(path) as f:
            steps.extend(csv.DictReader(f))
    w_file = next(iter(sorted(run.rglob("w_values.npy"))), None)
    if w_file is None:  # fall back to the per-step training means of w
        w = np.array([float(s["train/w_mean"]) for s in steps if s.get("train/w_mean")])
    else:
        w = np.load(w_file)
    return {
        "dir": run,
        "label": label or run_label(cfg),
        "loss_name": "" if label else str(cfg.get("loss", {}).get("_target_", "")).rsplit(".", 1)[-1],
        "tau": None if label else cfg.get("loss", {}).get("tau"),
        "seed": cfg.get("seed"),
        "metrics": metrics,
        "steps": steps,
        "w": w if len(w) else None,
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def fmt(mean: float, std: float, n: int) -> str:
    return f"{mean:.4f}" if n == 1 else f"{mean:.4f} +- {std:.4f}"


def results_table(runs: list[dict]) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        groups[r["label"]].append(r)
    base = groups.get("LML")
    lines = ["| loss | runs | " + " | ".join(c for c, _ in COLUMNS) + " |",
             "| --- | --- | " + " | ".join("---" for _ in COLUMNS) + " |"]
    for label in sorted(groups, key=lambda s: (s != "LML", s)):
        rs = groups[label]
        cells = []
        for _, key in COLUMNS:
            m, s = mean_std([r["metrics"].get(key, math.nan) for r in rs])
            cell = fmt(m, s, len(rs))
            if base and label != "LML":
                b, _ = mean_std([r["metrics"].get(key, math.nan) for r in base])
                if b > 0:
                    cell += f" ({100 * (m - b) / b:+.1f}%)"
            cells.append(cell)
        lines.append(f"| {label} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tau_table(runs: list[dict]) -> str | None:
    by = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r["tau"] is not None and r["loss_name"] in ("LMLLoss", "MSLLoss"):
            by[r["loss_name"]][float(r["tau"])].append(r["metrics"].get("ndcg@10", math.nan))
    taus = sorted({t for d in by.values() for t in d})
    if not any(len(d) > 1 for d in by.values()):
        return None
    lines = ["| loss | " + " | ".join(f"tau={t:g}" for t in taus) + " |", "| --- |" + " --- |" * len(taus)]
    for loss, d in sorted(by.items()):
        cells = [fmt(*mean_std(d[t]), len(d[t])) if t in d else "" for t in taus]
        lines.append(f"| {loss.replace('Loss', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_all(runs: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    # Fig. 6: NDCG@10 against tau per loss
    by = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r["tau"] is not None and r["loss_name"] in ("LMLLoss", "MSLLoss"):
            by[r["loss_name"]][float(r["tau"])].append(r["metrics"].get("ndcg@10", math.nan))
    if any(len(d) > 1 for d in by.values()):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for loss, d in sorted(by.items()):
            taus = sorted(d)
            ax.errorbar(taus, [np.mean(d[t]) for t in taus], yerr=[np.std(d[t]) for t in taus],
                        marker="o", capsize=3, label=loss.replace("Loss", ""))
        ax.set(xlabel="temperature tau", ylabel="NDCG@10", title="NDCG@10 vs tau (Fig. 6)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "ndcg_vs_tau.png", dpi=110)
        plt.close(fig)
        made.append("ndcg_vs_tau.png")

    # training loss and ATS tau over steps
    def step_loss(s: dict) -> str | None:  # Lightning names the per-step value train/loss_step
        return s.get("train/loss_step") or s.get("train/loss")

    curves = [r for r in runs if any(step_loss(s) for s in r["steps"])]
    if curves:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
        for r in curves:
            pts = [(int(s["step"]), float(step_loss(s))) for s in r["steps"] if step_loss(s)]
            a1.plot(*zip(*pts), label=f"{r['label']} s{r['seed']}", lw=1)
            tau = [(int(s["step"]), float(s["train/tau"])) for s in r["steps"] if s.get("train/tau")]
            if tau:
                a2.plot(*zip(*tau), label=f"{r['label']} s{r['seed']}", lw=1)
        a1.set(xlabel="step", ylabel="training loss", title="training loss")
        a2.set(xlabel="step", ylabel="tau", title="temperature (ATS: adaptive)")
        a1.legend(fontsize=7)
        a2.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "training_curves.png", dpi=110)
        plt.close(fig)
        made.append("training_curves.png")

    # Fig. 5: distribution of w = 1 - P_valid(y)
    ws = [(r["label"], r["w"]) for r in runs if r["w"] is not None]
    if ws:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        bins = np.linspace(0, 1, 41)
        seen = set()
        for label, w in ws:
            if label in seen:
                continue
            seen.add(label)
            ax.hist(w, bins=bins, alpha=0.5, density=True, label=f"{label} (mean {w.mean():.3f})")
        ax.set(xlabel="w = 1 - P_valid(y)", ylabel="density", title="Weight on the valid set (Fig. 5)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "w_distribution.png", dpi=110)
        plt.close(fig)
        made.append("w_distribution.png")
    return made


def write_report(roots: list[Path], out: Path) -> Path:
    runs = [load_run(r) for r in find_runs(roots)]
    if not runs:
        raise SystemExit(f"no finished runs (a .hydra/config.yaml beside a metrics.json) under {roots}")
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_all(runs, out)
    parts = ["# Results", "", f"{len(runs)} runs from {', '.join(str(r) for r in roots)}.", "",
             ("Validation metrics of each run's checkpoint with the best NDCG@5 (in parentheses: "
              "relative change against LML)."), "", results_table(runs), ""]
    tt = tau_table(runs)
    if tt:
        parts += ["## NDCG@10 against tau", "", tt, ""]
    parts += ["## Runs", "", "| run | loss | seed | N@10 | H@10 |", "| --- | --- | --- | --- | --- |"]
    for r in runs:
        parts.append(f"| `{r['dir'].name}` | {r['label']} | {r['seed']} | "
                     f"{r['metrics'].get('ndcg@10', math.nan):.4f} | {r['metrics'].get('hr@10', math.nan):.4f} |")
    parts += [""] + [f"![{p}]({p})" for p in plots]
    path = out / "results.md"
    path.write_text("\n".join(parts) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="sweep or run folders")
    ap.add_argument("--out", type=Path, default=None, help="where results.md and the PNGs go")
    args = ap.parse_args()
    path = write_report(args.dirs, args.out or args.dirs[0])
    print(f"report: {path}")


if __name__ == "__main__":
    main()
