"""Tables and plots from finished runs: ``python -m experiments.report <sweep or run dirs> [--out DIR]``.

A run folder is one that holds ``.hydra/config.yaml`` and ``metrics.json`` (written by the train
app: validation metrics of the checkpoint with the best NDCG@5, as the paper reports). Runs are
grouped by their loss label (``lml``, ``msl (tau=1.5)``, ``msl_ats`` ...); several seeds give
mean +- std. Writes into ``--out`` (default: the first folder given):

- ``results.md``: Table-5-style N@5, N@10, H@5, H@10 (and ``target_logp`` when evaluated) per loss
  with the relative improvement over LML; the paired comparison of every model with LML on the same
  users (evaluations with a ``predictions.jsonl``: difference, bootstrap 95% interval over users and
  seeds, sign-flip p-value, minimum detectable effect; see :mod:`msl_rec.significance`); and
  Table-6/Fig-6-style NDCG@10 against tau when runs differ in tau;
- ``ndcg_vs_tau.png`` (Fig. 6), ``training_curves.png`` (loss and ATS tau over steps),
  ``w_distribution.png`` (Fig. 5: ``w = 1 - P(y)`` (LML's weight) and ``w = 1 - P_valid(y)`` (MSL's)
  per response position, sorted descending, one pair of curves per evaluated model; from the
  ``w_values.npz`` of ``msl-rec-eval save_w=true``).
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
LOGP = ("logp", "target_logp")  # mean log-likelihood of the target title; a column when evaluated
PAIRED = ["ndcg@10", "hr@10", "target_logp"]  # the per-user values compared with LML
BASE = "LML"


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
        if not source.is_absolute() and (run / source).is_dir():  # an exported comparison (experiments.compare)
            source = run / source
        cfg = yaml.safe_load((source / ".hydra" / "config.yaml").read_text())
    elif "split" in cfg and not cfg.get("ckpt_path"):  # an eval of no trained model
        decoder = cfg.get("decoder", {}).get("name", "decoder")
        label = decoder if decoder in ("popularity", "random") else f"zero-shot ({decoder})"
    steps = []
    for path in sorted(source.rglob("metrics.csv")):
        with open(path) as f:
            steps.extend(csv.DictReader(f))
    return {
        "dir": run,
        "label": label or run_label(cfg),
        "loss_name": "" if label else str(cfg.get("loss", {}).get("_target_", "")).rsplit(".", 1)[-1],
        "tau": None if label else cfg.get("loss", {}).get("tau"),
        "seed": cfg.get("seed"),
        "metrics": metrics,
        "steps": steps,
        "w": load_w(run),
        "predictions": run / "predictions.jsonl" if (run / "predictions.jsonl").is_file() else None,
    }


def load_w(run: Path) -> dict[str, np.ndarray] | None:
    """Fig. 5 values of an evaluation: ``{"w_lml": 1 - P(y), "w_msl": 1 - P_valid(y)}`` per response
    position with more than one valid token (``w_values.npz``); an older ``w_values.npy`` holds
    ``w_msl`` alone."""
    if (run / "w_values.npz").is_file():
        with np.load(run / "w_values.npz") as z:
            w = {k: z[k] for k in ("w_lml", "w_msl") if k in z.files}
            if "num_valid" in z.files:  # positions with one valid token have w_msl = 0 by construction
                w = {k: v[z["num_valid"] > 1] for k, v in w.items()}
        if not w:
            raise ValueError(f"{run / 'w_values.npz'}: neither w_lml nor w_msl in it (keys: {z.files})")
        return w
    if (run / "w_values.npy").is_file():
        return {"w_msl": np.load(run / "w_values.npy")}
    return None


def user_rows(run: dict) -> dict[int, dict]:
    """An evaluation's users by row of the split: ``{row: {"user", "target", metric: value}}``.

    The row is the prediction's ``row`` field when written, else its position plus the first row
    of the evaluation (``eval_key.json``; 0 for merged shards, which start at row 0 of the split).
    """
    from msl_rec.decoding import load_predictions
    from msl_rec.metrics import compute_metrics

    path = run["predictions"]
    key_file = path.parent / "eval_key.json"
    rows = json.loads(key_file.read_text())["rows"] if key_file.is_file() else [0]
    start = rows[0][0] if rows and isinstance(rows[0], list) else rows[0]  # a merge keeps each shard's [lo, hi)
    out = {}
    for i, p in enumerate(load_predictions(path)):
        row = int(p["row"]) if "row" in p else start + i
        if row in out:
            raise ValueError(f"{path}: row {row} appears twice")
        values = compute_metrics([p["rank"]], (10,))
        values = {k: values[k] for k in ("ndcg@10", "hr@10")}
        if p.get("target_logp") is not None:
            values["target_logp"] = float(p["target_logp"])
        out[row] = {"user": p["user_id"], "target": p["target_id"], **values}
    return out


def distinct_first(run: dict) -> int | None:
    """How many different titles an evaluation ranks first across its users (None: no predictions)."""
    from msl_rec.decoding import load_predictions

    if run["predictions"] is None:
        return None
    return len({tuple(sorted(p["ranked_ids"][0])) for p in load_predictions(run["predictions"]) if p["ranked_ids"]})


def paired_comparisons(runs: list[dict]) -> list[tuple[str, object]]:
    """Every labelled group of evaluations against LML's on the users all of them share.

    Runs of one label are its seeds. Raises if two evaluations disagree on a row's user or target
    (they evaluated different files or orders): a paired difference would be meaningless.
    """
    from msl_rec.significance import compare_paired

    groups: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        if r["predictions"] is not None:
            groups[r["label"]].append(r)
    if BASE not in groups or len(groups) < 2:
        return []
    tables = {id(r): user_rows(r) for rs in groups.values() for r in rs}
    out = []
    for label in sorted(groups, key=lambda s: (s in ("popularity", "random") or s.startswith("zero-shot"), s)):
        if label == BASE:
            continue
        both = groups[label] + groups[BASE]
        rows = sorted(set.intersection(*(set(tables[id(r)]) for r in both)))
        if not rows:
            continue
        ref = tables[id(both[0])]
        for r in both[1:]:
            t = tables[id(r)]
            bad = next((i for i in rows if (t[i]["user"], t[i]["target"]) != (ref[i]["user"], ref[i]["target"])), None)
            if bad is not None:
                raise ValueError(f"row {bad}: {r['predictions']} has user/target {t[bad]['user']}/{t[bad]['target']}, "
                                 f"{both[0]['predictions']} has {ref[bad]['user']}/{ref[bad]['target']}; "
                                 "compare evaluations of the same split file")
        for metric in PAIRED:
            if not all(metric in tables[id(r)][i] for r in both for i in rows):
                continue
            vals = [[np.array([tables[id(r)][i][metric] for i in rows]) for r in g]
                    for g in (groups[label], groups[BASE])]
            out.append((label, compare_paired(np.stack(vals[0]), np.stack(vals[1]), metric)))
    return out


def paired_table(comparisons: list[tuple[str, object]]) -> str:
    lines = [f"| model | metric | users | seeds (model, {BASE}) | model | {BASE} | difference | 95% CI | p | MDE | verdict |",
             "| --- |" + " --- |" * 10]
    for label, c in comparisons:
        lines.append(f"| {label} | {c.metric} | {c.n_users} | {c.n_seeds[0]}, {c.n_seeds[1]} | {c.model_mean:.4f} | "
                     f"{c.base_mean:.4f} | {c.diff:+.4f} | [{c.ci_low:+.4f}, {c.ci_high:+.4f}] | {c.p_value:.3g} | "
                     f"{c.mde:.4f} | {c.verdict} |")
    return "\n".join(lines)


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def fmt(mean: float, std: float, n: int) -> str:
    return f"{mean:.4f}" if n == 1 else f"{mean:.4f} +- {std:.4f}"


def results_table(runs: list[dict]) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        groups[r["label"]].append(r)
    base = groups.get(BASE)
    columns = COLUMNS + ([LOGP] if any(LOGP[1] in r["metrics"] for r in runs) else [])
    lines = ["| loss | runs | " + " | ".join(c for c, _ in columns) + " |",
             "| --- | --- | " + " | ".join("---" for _ in columns) + " |"]
    for label in sorted(groups, key=lambda s: (s != BASE, s)):
        rs = groups[label]
        cells = []
        for _, key in columns:
            if not any(key in r["metrics"] for r in rs):
                cells.append("")
                continue
            m, s = mean_std([r["metrics"].get(key, math.nan) for r in rs])
            cell = fmt(m, s, len(rs))
            if base and label != BASE and key != LOGP[1]:
                b, _ = mean_std([r["metrics"].get(key, math.nan) for r in base])
                if b > 0:
                    cell += f" ({100 * (m - b) / b:+.1f}%)"
            cells.append(cell)
        lines.append(f"| {label} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_tau(runs: list[dict], key: str) -> dict[str, dict[float, list[float]]]:
    """``{loss name: {tau: [metric of each run]}}`` over the LML and MSL runs that have ``key``."""
    by: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r["tau"] is not None and r["loss_name"] in ("LMLLoss", "MSLLoss") and key in r["metrics"]:
            by[r["loss_name"]][float(r["tau"])].append(r["metrics"][key])
    return by


def tau_table(runs: list[dict]) -> str | None:
    """Table 6: each metric at each tau (mean +- std over seeds); None without two taus of a loss."""
    tables = {key: by_tau(runs, key) for key in ("ndcg@10", "hr@10", LOGP[1])}
    taus = sorted({t for by in tables.values() for d in by.values() for t in d})
    if not any(len(d) > 1 for d in tables["ndcg@10"].values()):
        return None
    lines = ["| loss | metric | " + " | ".join(f"tau={t:g}" for t in taus) + " |", "| --- | --- |" + " --- |" * len(taus)]
    for key, by in tables.items():
        for loss, d in sorted(by.items()):
            cells = [fmt(*mean_std(d[t]), len(d[t])) if t in d else "" for t in taus]
            lines.append(f"| {loss.replace('Loss', '')} | {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_all(runs: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    # Fig. 6: NDCG@10 (and target_logp, when evaluated) against tau per loss
    panels = [(key, by_tau(runs, key)) for key in ("ndcg@10", LOGP[1])]
    panels = [(key, by) for key, by in panels if any(len(d) > 1 for d in by.values())]
    if panels and panels[0][0] == "ndcg@10":
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
        for ax, (key, by) in zip(axes[0], panels):
            for loss, d in sorted(by.items()):
                taus = sorted(d)
                ax.errorbar(taus, [np.mean(d[t]) for t in taus], yerr=[np.std(d[t]) for t in taus],
                            marker="o", capsize=3, label=loss.replace("Loss", ""))
            ax.set(xlabel="temperature tau", ylabel=key, title=f"{key} vs tau" + (" (Fig. 6)" if key == "ndcg@10" else ""))
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
                line, = a2.plot(*zip(*tau), label=f"{r['label']} s{r['seed']}", lw=1)
            raw = [(int(s["step"]), float(s["train/tau_raw"])) for s in r["steps"] if s.get("train/tau_raw")]
            if raw:  # ATS's Eq. 12 root before the clamp and the EMA: why tau sits where it does
                a2.plot(*zip(*raw), ls=":", lw=1, color=line.get_color() if tau else None,
                        label=f"{r['label']} s{r['seed']} raw root (before clamp)")
        a1.set(xlabel="step", ylabel="training loss", title="training loss")
        a2.set(xlabel="step", ylabel="tau", title="temperature (ATS: EMA of the clamped root)")
        a1.legend(fontsize=7)
        a2.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "training_curves.png", dpi=110)
        plt.close(fig)
        made.append("training_curves.png")

    # Fig. 5: the gradient weight w of the target token at each response position, sorted descending
    ws = [r for r in runs if r["w"] is not None]
    if ws:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        styles = {"w_lml": ("-", "1 - P(y)"), "w_msl": ("--", "1 - P_valid(y)")}
        for i, r in enumerate(ws):
            name = r["label"] + (f" s{r['seed']}" if sum(q["label"] == r["label"] for q in ws) > 1 else "")
            for key, w in r["w"].items():
                y = np.sort(np.asarray(w, dtype=float).ravel())[::-1]
                ax.plot(np.linspace(0, 1, len(y)), y, styles[key][0], color=f"C{i}", lw=1.2,
                        label=f"{name}: {styles[key][1]} (mean {y.mean():.3f})")
        ax.set(xlabel="response positions, sorted by w (fraction)", ylabel="w",
               title="Target-token gradient weight w (Fig. 5)", ylim=(0, 1.02))
        ax.legend(fontsize=7)
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
             ("Metrics of each evaluation (msl-rec-eval: its split and users)" if all(r["predictions"] for r in runs)
              else "Validation metrics of each run's checkpoint with the best NDCG@5")
             + " (in parentheses: relative change against LML).", "", results_table(runs), ""]
    comparisons = paired_comparisons(runs)
    if comparisons:
        parts += [f"## Paired comparison with {BASE} (same users)", "",
                  (f"Per-user differences (model - {BASE}; each model's value averaged over its seeds). 95% CI: "
                   "percentile bootstrap, resampling seeds then users (10,000 replicates). p: two-sided paired "
                   "sign-flip permutation test of the mean difference. MDE: the smallest true difference this "
                   "run finds with 80% power at alpha 0.05, 2.8 x sd(differences) / sqrt(users). \"no detectable "
                   "difference\": the interval covers 0."), "", paired_table(comparisons), ""]
    tt = tau_table(runs)
    if tt:
        parts += ["## Metrics against tau (Table 6; mean +- std over seeds)", "", tt, ""]
    parts += ["## Runs", "", "| run | loss | seed | N@10 | H@10 | distinct #1 titles |", "| --- |" + " --- |" * 5]
    for r in runs:
        first = distinct_first(r)
        parts.append(f"| `{r['dir'].name}` | {r['label']} | {r['seed']} | "
                     f"{r['metrics'].get('ndcg@10', math.nan):.4f} | {r['metrics'].get('hr@10', math.nan):.4f} | "
                     f"{'' if first is None else first} |")
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
    print(path.read_text())
    print(f"report: {path}")


if __name__ == "__main__":
    main()
