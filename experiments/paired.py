"""Paired comparison of evaluations on the split rows they share, whatever differs between them (method,
decoder, loss): ``python -m experiments.paired --base NAME=DIR[,DIR...] NAME=DIR[,DIR...] ... [--rows N]``.

Each ``NAME=DIR,DIR,...`` is one model: its evaluations' folders (each with ``predictions.jsonl``), one per seed.
Every model is compared with ``--base`` on the rows all of them share (``--rows N``: only the first N rows of
the split) with :func:`msl_rec.significance.compare_paired` (bootstrap 95% interval over seeds then users,
sign-flip p-value, minimum detectable effect) on NDCG@10, HR@10 and, where every evaluation has it,
``target_logp``. Evaluations that disagree on a row's user or target (another split file) are an error.
Prints a Markdown table (``--out FILE`` also writes it).

The report (:mod:`experiments.report`) compares runs within one context (the same decoder); this is for the
comparisons across contexts Table 5 needs: grounding vs constrained beam search on the same adapter, a
sequential model vs an LLM on the same users.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from experiments.report import user_rows
from msl_rec.significance import compare_paired

METRICS = ("ndcg@10", "hr@10", "target_logp")


def parse_model(spec: str) -> tuple[str, list[Path]]:
    name, sep, dirs = spec.partition("=")
    if not sep or not name or not dirs:
        raise SystemExit(f"{spec!r}: expected NAME=DIR[,DIR...]")
    folders = [Path(d) for d in dirs.split(",")]
    for f in folders:
        if not (f / "predictions.jsonl").is_file():
            raise SystemExit(f"{name}: {f / 'predictions.jsonl'} does not exist (not an msl-rec-eval folder?)")
    return name, folders


def load(folders: list[Path]) -> list[dict[int, dict]]:
    return [user_rows({"predictions": f / "predictions.jsonl"}) for f in folders]


def compare(base: tuple[str, list[Path]], models: list[tuple[str, list[Path]]], rows: int | None = None,
            metrics: tuple[str, ...] = METRICS) -> str:
    tables = {name: load(folders) for name, folders in [base, *models]}
    shared = set.intersection(*(set(t) for ts in tables.values() for t in ts))
    if rows is not None:
        shared = {r for r in shared if r < rows}
    shared = sorted(shared)
    if not shared:
        raise SystemExit("the evaluations share no split rows")
    ref_name, ref = base[0], tables[base[0]][0]
    for name, ts in tables.items():
        for t in ts:
            bad = next((r for r in shared if (t[r]["user"], t[r]["target"]) != (ref[r]["user"], ref[r]["target"])), None)
            if bad is not None:
                raise SystemExit(f"row {bad}: {name} has user/target {t[bad]['user']}/{t[bad]['target']}, {ref_name} "
                                 f"has {ref[bad]['user']}/{ref[bad]['target']}: evaluations of different split files")
    lines = [(f"Paired comparison with {ref_name} on {len(shared)} shared rows (rows {shared[0]}-{shared[-1]}); "
             "95% CI: bootstrap over seeds then users; p: sign-flip test; MDE at 80% power."), "",
             f"| model | metric | seeds (model, base) | model | {ref_name} | difference | 95% CI | p | MDE | verdict |",
             "| --- |" + " --- |" * 9]
    for name, _ in models:
        for metric in metrics:
            if not all(metric in t[r] for ts in (tables[name], tables[ref_name]) for t in ts for r in shared):
                continue
            vals = [np.stack([np.array([t[r][metric] for r in shared]) for t in tables[n]]) for n in (name, ref_name)]
            c = compare_paired(vals[0], vals[1], metric)
            lines.append(f"| {name} | {metric} | {c.n_seeds[0]}, {c.n_seeds[1]} | {c.model_mean:.4f} | "
                         f"{c.base_mean:.4f} | {c.diff:+.4f} | [{c.ci_low:+.4f}, {c.ci_high:+.4f}] | {c.p_value:.3g} | "
                         f"{c.mde:.4f} | {c.verdict} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="NAME=DIR[,DIR...]: the baseline's evaluations")
    ap.add_argument("models", nargs="+", help="NAME=DIR[,DIR...]: a model's evaluations (one per seed)")
    ap.add_argument("--rows", type=int, default=None, help="only the first N rows of the split")
    ap.add_argument("--metrics", nargs="+", default=list(METRICS),
                    help="per-user values to compare (target_logp only between evaluations of one decoder masking)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()
    table = compare(parse_model(args.base), [parse_model(m) for m in args.models], args.rows, tuple(args.metrics))
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
