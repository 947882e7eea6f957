"""Tables and plots from finished runs: ``python -m experiments.report <sweep or run dirs> [--out DIR]``.

A run folder is one that holds ``.hydra/config.yaml`` and ``metrics.json`` (written by the train
app: validation metrics of the checkpoint with the best ``monitor.metric``, NDCG@10 by default; or
by ``msl-rec-eval``: the metrics of its split and users). An evaluation of a training run
(``msl-rec-eval run_dir=<train run>``) takes its dataset, backbone, loss and seed from that run.

Runs are grouped in two levels, so that no number mixes things that differ:

- a **context**: (dataset, backbone, decoder, split, user set). The user set is the set of evaluated
  users: a hash of the sorted ``(row, user_id)`` pairs of ``predictions.jsonl``; without one, the
  rows in ``eval_key.json`` or the ``subset``/``shard`` of the evaluation, or a training run's
  ``data.valid_subset`` (and ``trainer.limit_val_batches``). Model-free baselines (``popularity``,
  ``random``) have no backbone or decoder: they join every context of their dataset, split and users.
  Each context is its own section of ``results.md``;
- within a context, a **row** per loss label (``LML``, ``MSL (tau=1.5)``, ``MSL+ATS`` ...); its runs
  are its seeds (mean +- std). Two runs of one label with the same seed in one context are an error
  naming both folders (the same run counted twice).

Relative improvements over LML and paired comparisons are computed only between rows of one context
(the same users). Two evaluations of one dataset and split that disagree on a row's user or target
(different split files) are an error. Folders with a ``failed.json`` (a failed sweep job) or with a
config but no ``metrics.json`` are listed under "Failed or unfinished runs" and kept out of the
tables; a truncated ``metrics.json`` or ``config.yaml`` is an error naming the file.

Writes into ``--out`` (default: the first folder given):

- ``results.md``: per context, Table-5-style N@5, N@10, H@5, H@10 (and ``target_logp`` when
  evaluated) per loss with the number of users and the relative improvement over LML; the paired
  comparison of every model with LML on the same users (evaluations with a ``predictions.jsonl``:
  difference, bootstrap 95% interval over users and seeds, sign-flip p-value, minimum detectable
  effect; see :mod:`msl_rec.significance`); and Table-6/Fig-6-style NDCG@10 against tau when runs
  differ in tau;
- ``ndcg_vs_tau.png`` (Fig. 6), ``training_curves.png`` (loss and ATS tau over steps; from the CSV
  logger's ``metrics.csv``, or from the wandb run files of a ``logger=wandb`` run: :func:`load_curves`),
  ``w_distribution.png`` (Fig. 5: ``w = 1 - P(y)`` (LML's weight) and ``w = 1 - P_valid(y)`` (MSL's)
  per response position, sorted descending, one pair of curves per evaluated model; from the
  ``w_values.npz`` of ``msl-rec-eval save_w=true``).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from msl_rec.utils import wandb_files

COLUMNS = [("N@5", "ndcg@5"), ("N@10", "ndcg@10"), ("H@5", "hr@5"), ("H@10", "hr@10")]
LOGP = ("logp", "target_logp")  # mean log-likelihood of the target title; a column when evaluated
PAIRED = ["ndcg@10", "hr@10", "target_logp"]  # the per-user values compared with LML
BASE = "LML"
MODEL_FREE = ("popularity", "random")  # baselines without a model: the same on every backbone and decoder
FAILED = "failed.json"  # a failed job's {"error", "type", "overrides"}: msl_rec.utils.task.write_failure
# a logger=wandb run's files: <run>/wandb/offline-run-<time>-<id>/run-<id>.wandb (online: run-<time>-<id>/)
WANDB_RUN_FILES = "wandb/*run-*/run-*.wandb"


def read_run_file(path: Path, run: Path) -> dict:
    """A run's JSON or YAML file (by suffix) as a dict; a missing, truncated or invalid one is an
    error naming the file and what to do."""
    fix = f"re-run or re-evaluate that run (or remove its folder {run}), then make the report again"
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; {fix}") from None
    try:
        data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        reason = str(e).splitlines()[0]
        raise ValueError(f"{path}: not valid {kind} ({reason}); the run was probably interrupted while "
                         f"writing it: {fix}") from None
    if isinstance(data, dict):
        return data
    raise ValueError(f"{path}: expected a {kind} mapping, found {type(data).__name__} (empty or truncated?); "
                     f"{fix}")


def run_folders(roots: list[Path]) -> list[Path]:
    """Every folder under ``roots`` with a ``.hydra/config.yaml`` or a ``failed.json``, sorted."""
    found: set[Path] = set()
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such folder (give sweep or run folders)")
        found |= {cfg.parent.parent for cfg in root.rglob(".hydra/config.yaml")}
        found |= {f.parent for f in root.rglob(FAILED)}
    return sorted(found)


def find_runs(roots: list[Path]) -> list[Path]:
    """Finished runs: a ``.hydra/config.yaml`` beside a ``metrics.json``, and no ``failed.json``
    (a job that failed after a validation has a ``metrics.json`` of a run that did not finish)."""
    return [run for run in run_folders(roots)
            if (run / ".hydra" / "config.yaml").is_file() and (run / "metrics.json").is_file()
            and not (run / FAILED).is_file()]


def find_failed(roots: list[Path], used: set[Path]) -> list[dict]:
    """Failed or unfinished runs, ``[{"dir", "status", "error", "overrides"}]``: folders with a
    ``failed.json``, and folders with a config but no ``metrics.json`` that no evaluation in the
    report uses as its ``run_dir`` (``used``: resolved paths; a training without validation has no
    ``metrics.json`` and is reported through its evaluations)."""
    out = []
    for run in run_folders(roots):
        if (run / FAILED).is_file():
            try:
                info = read_run_file(run / FAILED, run)
            except ValueError as e:  # still a failed job: show what is there
                info = {"error": str(e)}
            error = str(info.get("error", "")).strip()
            out.append({"dir": run, "status": "failed",
                        "overrides": info.get("overrides") or overrides_of(run),
                        "error": f"{info['type']}: {error}" if info.get("type") else error})
        elif not (run / "metrics.json").is_file() and run.resolve() not in used:
            out.append({"dir": run, "status": "unfinished", "overrides": overrides_of(run),
                        "error": "no metrics.json: still running, killed, or trained without validation "
                                 "(evaluate it: msl-rec-eval run_dir=<folder>)"})
    return out


def overrides_of(run: Path) -> list[str]:
    """The command-line overrides Hydra saved for ``run`` ([] when there are none or they are unreadable)."""
    try:
        saved = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    return [str(o) for o in saved] if isinstance(saved, list) else []


SEQUENTIAL_LABELS = {"sasrec": ("SASRec", "BCELoss"), "bert4rec": ("BERT4Rec", "CELoss")}  # name, default loss
HYBRID_LABELS = {"llara": "LLaRA", "allmrec": "A-LLMRec"}  # Table 5's names of the other LLM methods
SEQUENTIAL_LOSS_LABELS = {"BCELoss": " (BCE)", "CELoss": " (CE)", "DROSLoss": "+DROS"}


def is_sequential(cfg: dict) -> bool:
    return (cfg.get("method") or {}).get("kind") == "sequential"


def run_label(cfg: dict) -> str:
    loss = cfg.get("loss", {})
    name = str(loss.get("_target_", "loss")).rsplit(".", 1)[-1]
    if is_sequential(cfg):  # SASRec, SASRec+DROS, SASRec (CE), BERT4Rec ...
        method = str(cfg["method"].get("name"))
        title, default_loss = SEQUENTIAL_LABELS.get(method, (method, None))
        return title + ("" if name == default_loss else SEQUENTIAL_LOSS_LABELS.get(name, f" ({name})"))
    label = {"LMLLoss": "LML", "MSLLoss": "MSL", "MSLATSLoss": "MSL+ATS", "SDPOLoss": "S-DPO"}.get(name, name)
    tau = loss.get("tau")
    if tau is not None and label in ("LML", "MSL") and float(tau) != 1.0:
        label += f" (tau={float(tau):g})"
    if loss.get("alpha_mode"):
        label += " + alpha"
    method = str((cfg.get("method") or {}).get("name") or "bigrec")
    return label if method == "bigrec" else f"{HYBRID_LABELS.get(method, method)}+{label}"  # LLaRA+MSL


def lml_base(label: str) -> str:
    """The LML row a model is read against: its own LLM method's (``LLaRA+MSL`` -> ``LLaRA+LML``), else BIGRec's ``LML``."""
    for name in HYBRID_LABELS.values():
        if label.startswith(name + "+"):
            return f"{name}+{BASE}"
    return BASE


def load_run(run: Path) -> dict:
    """One run's config, final metrics, per-step log, w values and context.

    An ``msl-rec-eval run_dir=<train run>`` folder counts as that training run: its loss, seed,
    dataset, backbone and training curves come from the training folder (``source``), its metrics,
    decoder, split and users from the evaluation.
    """
    own = read_run_file(run / ".hydra" / "config.yaml", run)
    metrics = read_run_file(run / "metrics.json", run)
    cfg, source, label = own, run, None
    if own.get("run_dir"):
        source = Path(own["run_dir"])
        if not source.is_absolute() and (run / source).is_dir():  # an exported comparison (experiments.compare)
            source = run / source
        if not (source / ".hydra" / "config.yaml").is_file():
            raise FileNotFoundError(f"{run}: its training run run_dir={own['run_dir']} has no "
                                    ".hydra/config.yaml (moved or deleted?); restore that folder, or remove "
                                    f"the evaluation {run}")
        cfg = read_run_file(source / ".hydra" / "config.yaml", source)
    elif "split" in own and not own.get("ckpt_path"):  # an eval of no trained model
        decoder = (own.get("decoder") or {}).get("name", "decoder")
        label = decoder if decoder in MODEL_FREE else f"zero-shot ({decoder})"
    steps = load_curves(source)
    predictions = run / "predictions.jsonl" if (run / "predictions.jsonl").is_file() else None
    rows = user_rows({"predictions": predictions}) if predictions else None
    model_free = label in MODEL_FREE
    sequential = is_sequential(cfg)
    return {
        "dir": run,
        "source": source,
        "label": label or run_label(cfg),
        "loss_name": "" if label else str(cfg.get("loss", {}).get("_target_", "")).rsplit(".", 1)[-1],
        "tau": None if label else cfg.get("loss", {}).get("tau"),
        "seed": cfg.get("seed"),
        "metrics": metrics,
        "steps": steps,
        "w": load_w(run),
        "predictions": predictions,
        "rows": rows,
        # the context: what must be equal for two runs' numbers to be compared
        "model_free": model_free,
        # no LLM backbone or decoder: joins every context of its dataset, split and users (as popularity does)
        "joins": model_free or sequential,
        "dataset": (cfg.get("dataset") or {}).get("name"),
        "backbone": None if model_free or sequential else (cfg.get("backbone") or {}).get("name"),
        # what the evaluation decoded with (its eval_key.json: a run_dir= evaluation of a sequential run takes
        # the run's decoder, which the composed config does not show); else the config's
        "decoder": None if model_free else eval_decoder(run, own),
        "split": own.get("split", "valid"),  # a training run's metrics are on its validation users
        "users": user_set(run, own, rows),
    }


def eval_decoder(run: Path, own: dict) -> str | None:
    """The decoder name an evaluation used (``eval_key.json``), else its config's."""
    key_file = run / "eval_key.json"
    if key_file.is_file():
        name = (read_run_file(key_file, run).get("decoder") or {}).get("name")
        if name:
            return name
    return (own.get("decoder") or {}).get("name")


def load_curves(run: Path) -> list[dict[str, str]]:
    """A training run's per-step log: one row per logged step, ``{"step": "3", "train/loss_step": "4.2",
    "train/tau": "1.5", ...}`` (strings, as ``csv.DictReader`` gives them).

    From the CSV logger's ``metrics.csv`` files under ``run`` (every ``version_<n>`` of a resumed run); a
    run without one (``logger=wandb``) from its wandb run files (:data:`WANDB_RUN_FILES`, in time order:
    a resumed run has one per process), whose history rows are keyed ``trainer/global_step`` (else
    ``_step``). No log: ``[]``.
    """
    steps: list[dict[str, str]] = []
    for path in sorted(run.rglob("metrics.csv")):
        with open(path) as f:
            steps.extend(csv.DictReader(f))
    if steps:
        return steps
    for path in sorted(run.glob(WANDB_RUN_FILES)):
        for row in wandb_files.history(path):
            step = row.get("trainer/global_step", row.get("_step"))
            if step is not None:
                steps.append({**row, "step": str(int(float(step)))})
    return steps


def compact(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ``[lo, hi)`` row ranges with touching or overlapping ones joined."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def ranges_text(ranges: list[tuple[int, int]], most: int = 4) -> str:
    parts = [f"{lo}-{hi - 1}" if hi - lo > 1 else str(lo) for lo, hi in ranges]
    return ", ".join(parts[:most]) + (f", ... ({len(parts)} ranges)" if len(parts) > most else "")


def user_set(run: Path, own: dict, rows: dict[int, dict] | None) -> dict:
    """The users a run's metrics are over: ``{"id": key, "n": count or None, "desc": words}``.

    From the most to the least precise: the ``(row, user_id)`` pairs of ``predictions.jsonl``
    (``rows``, from :func:`user_rows`), the row ranges of ``eval_key.json``, an evaluation's
    ``subset``/``shard``, a training run's ``data.valid_subset`` and ``trainer.limit_val_batches``.
    """
    split = own.get("split", "valid")
    if rows is not None:
        pairs = sorted((row, v["user"]) for row, v in rows.items())
        digest = hashlib.sha1(json.dumps(pairs).encode()).hexdigest()[:8]
        spans = compact([(row, row + 1) for row, _ in pairs])
        return {"id": f"users #{digest}", "n": len(pairs),
                "desc": f"{split} rows {ranges_text(spans)}, users #{digest}"}
    if (run / "eval_key.json").is_file():
        rows_key = read_run_file(run / "eval_key.json", run).get("rows") or []
        merged = rows_key and isinstance(rows_key[0], list)  # a merge keeps each shard's [lo, hi)
        spans = compact([tuple(r) for r in rows_key] if merged else [tuple(rows_key)])
        return {"id": f"rows {ranges_text(spans, most=10**9)}", "n": sum(hi - lo for lo, hi in spans),
                "desc": f"{split} rows {ranges_text(spans)}"}
    if "split" in own:  # an evaluation without predictions or key (an older one)
        subset, shard = own.get("subset"), own.get("shard")
        words = "all rows" if subset is None else f"first {subset} rows"
        words += "" if shard is None else f", shard {shard}"
        return {"id": f"subset={subset} shard={shard}", "n": subset if shard is None else None,
                "desc": f"{split} {words}"}
    subset = (own.get("data") or {}).get("valid_subset")
    limit = (own.get("trainer") or {}).get("limit_val_batches")
    limit = None if limit in (None, 1.0) else limit  # 1.0: Lightning's default, every batch
    words = ("all rows" if subset is None else f"first {subset} rows") + ("" if limit is None else
                                                                         f", limit_val_batches={limit}")
    return {"id": f"valid_subset={subset} limit_val_batches={limit}", "n": subset if limit is None else None,
            "desc": f"valid {words} (validation while training)"}


def n_users(run: dict) -> str:
    """The number of users a run's metrics are over, as a table cell ("all": every row of the split)."""
    users = run["users"]
    if users["n"] is not None:
        return str(users["n"])
    return "all" if users["desc"].split(" (")[0].endswith("all rows") else "?"


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
    from msl_rec.evaluation import load_predictions
    from msl_rec.metrics import compute_metrics

    path = run["predictions"]
    key_file = path.parent / "eval_key.json"
    rows = read_run_file(key_file, path.parent)["rows"] if key_file.is_file() else [0]
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
    from msl_rec.evaluation import load_predictions

    if run["predictions"] is None:
        return None
    return len({tuple(sorted(p["ranked_ids"][0])) for p in load_predictions(run["predictions"]) if p["ranked_ids"]})


def check_rows_agree(runs: list[dict]) -> None:
    """Evaluations of one dataset and split must agree on the user and target of every row they share:
    else they read different split files (or orders) under one name, and no user set is comparable."""
    seen: dict[tuple, dict[int, tuple]] = defaultdict(dict)
    for r in runs:
        if r["rows"] is None:
            continue
        table = seen[(r["dataset"], r["split"])]
        for row, v in r["rows"].items():
            first = table.setdefault(row, (v["user"], v["target"], r["predictions"]))
            if first[:2] != (v["user"], v["target"]):
                raise ValueError(f"row {row}: {first[2]} has user/target {first[0]}/{first[1]}, "
                                 f"{r['predictions']} has {v['user']}/{v['target']} (dataset {r['dataset']}, "
                                 f"split {r['split']}); compare evaluations of the same split file")


def context_key(run: dict) -> tuple:
    """(dataset, backbone, decoder, split, user set): runs whose numbers may be compared."""
    return run["dataset"], run["backbone"], run["decoder"], run["split"], run["users"]["id"]


def context_title(runs: list[dict]) -> str:
    model = next((r for r in runs if not r["model_free"]), runs[0])
    return (f"{model['dataset'] or 'unknown dataset'} / {model['backbone'] or 'no model'} / "
            f"{model['decoder'] or 'no decoder'} / {model['users']['desc']}")


def group_contexts(runs: list[dict]) -> list[list[dict]]:
    """The runs of each context (see the module docstring), in a stable order.

    A model-free baseline or a sequential model joins every context of its dataset, split and users (its own
    when there is none). Two runs of one label and seed in a context are an error naming both folders."""
    contexts: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        if not r["joins"]:
            contexts[context_key(r)].append(r)
    for r in runs:
        if r["joins"]:
            where = (r["dataset"], r["split"], r["users"]["id"])
            homes = [k for k in contexts if (k[0], k[3], k[4]) == where]
            for k in homes or [context_key(r)]:
                contexts[k].append(r)
    for rs in contexts.values():
        by: dict[tuple, dict] = {}
        for r in rs:
            other = by.setdefault((r["label"], r["seed"]), r)
            if other is not r:
                raise ValueError(f"{other['dir']} and {r['dir']}: both {r['label']} with seed {r['seed']} "
                                 f"on the same users ({context_title(rs)}), the same run counted twice "
                                 "(evaluated twice, or a copy); remove one of the folders or leave it out of "
                                 "the report's folders")
    def order(k: tuple) -> tuple:  # by dataset, backbone, decoder, split, then fewer users first
        words = tuple("" if x is None else str(x) for x in k)
        return *words[:4], contexts[k][0]["users"]["n"] or 0, words[4]

    return [contexts[k] for k in sorted(contexts, key=order)]


def paired_comparisons(runs: list[dict], base: str = BASE, same_method: bool = False) -> list[tuple[str, object]]:
    """Every labelled group of evaluations against ``base``'s (LML, or popularity) on the users all of them share.

    ``runs``: one context's (its evaluations have the same users). Runs of one label are its seeds.
    ``same_method``: only the labels whose :func:`lml_base` is ``base`` (``LLaRA+MSL`` against ``LLaRA+LML``).
    Raises if two evaluations disagree on a row's user or target (they evaluated different files or
    orders): a paired difference would be meaningless.
    """
    from msl_rec.significance import compare_paired

    groups: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        if r["predictions"] is not None:
            groups[r["label"]].append(r)
    if base not in groups or len(groups) < 2:
        return []
    tables = {id(r): r["rows"] if r.get("rows") is not None else user_rows(r)
              for rs in groups.values() for r in rs}
    out = []
    for label in sorted(groups, key=lambda s: (s in MODEL_FREE or s.startswith("zero-shot"), s)):
        if label == base or (same_method and lml_base(label) != base):
            continue
        both = groups[label] + groups[base]
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
                    for g in (groups[label], groups[base])]
            out.append((label, compare_paired(np.stack(vals[0]), np.stack(vals[1]), metric)))
    return out


def paired_table(comparisons: list[tuple[str, object]], base: str = BASE) -> str:
    lines = [f"| model | metric | users | seeds (model, {base}) | model | {base} | difference | 95% CI | p | MDE | verdict |",
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
    """Table 5 for one context's ``runs``: a row per label (its seeds: mean +- std), the number of
    users, and each metric's relative change against the LML row of its own method (:func:`lml_base`), a method's
    LML row against BIGRec's."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        groups[r["label"]].append(r)
    columns = COLUMNS + ([LOGP] if any(LOGP[1] in r["metrics"] for r in runs) else [])
    lines = ["| model | runs | users | " + " | ".join(c for c, _ in columns) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in columns) + " |"]
    for label in sorted(groups, key=lambda s: (s != BASE, s)):
        rs = groups[label]
        own = lml_base(label)  # LLaRA+MSL against LLaRA+LML; LLaRA+LML itself against BIGRec's LML
        base = None if label == BASE else groups.get(BASE if label == own else own)
        cells = []
        for _, key in columns:
            if not any(key in r["metrics"] for r in rs):
                cells.append("")
                continue
            m, s = mean_std([r["metrics"].get(key, math.nan) for r in rs])
            cell = fmt(m, s, len(rs))
            if base and key != LOGP[1]:
                b, _ = mean_std([r["metrics"].get(key, math.nan) for r in base])
                if b > 0:
                    cell += f" ({100 * (m - b) / b:+.1f}%)"
            cells.append(cell)
        lines.append(f"| {label} | {len(rs)} | {n_users(rs[0])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def failed_table(failed: list[dict]) -> str:
    lines = ["| run | status | error | overrides |", "| --- | --- | --- | --- |"]
    for f in failed:
        error = " ".join(f["error"].split()).replace("|", "\\|")
        error = error if len(error) <= 300 else error[:297] + "..."
        overrides = " ".join(f["overrides"]).replace("|", "\\|")
        lines.append(f"| `{f['dir']}` | {f['status']} | {error} | {overrides} |")
    return "\n".join(lines)


def by_tau(runs: list[dict], key: str) -> dict[str, dict[float, list[float]]]:
    """``{loss name: {tau: [metric of each run]}}`` over the LML and MSL runs that have ``key``."""
    by: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r["tau"] is not None and r["loss_name"] in ("LMLLoss", "MSLLoss") and key in r["metrics"]:
            by[r["loss_name"]][float(r["tau"])].append(r["metrics"][key])
    return by


def tau_table(runs: list[dict]) -> str | None:
    """Table 6 for one context's ``runs``: each metric at each tau (mean +- std over seeds); None
    without two taus of a loss."""
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


def run_name(r: dict, several_contexts: bool) -> str:
    """A run's legend entry: label, seed, and its context number(s) when the report has several."""
    where = f" [{','.join(f'C{i}' for i in r['contexts'])}]" if several_contexts else ""
    return f"{r['label']} s{r['seed']}{where}"


def plot_all(contexts: list[list[dict]], out: Path) -> list[str]:
    """The PNGs: curves of one context never mix with another's (several: ``[C<n>]`` in the legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    several = len(contexts) > 1
    runs = list({id(r): r for rs in contexts for r in rs}.values())  # a baseline may sit in several contexts
    # Fig. 6: NDCG@10 (and target_logp, when evaluated) against tau per loss, per context
    panels = []
    for key in ("ndcg@10", LOGP[1]):
        lines = [(f"C{i} " if several else "", by_tau(rs, key)) for i, rs in enumerate(contexts, 1)]
        lines = [(tag, by) for tag, by in lines if any(len(d) > 1 for d in by.values())]
        if lines:
            panels.append((key, lines))
    if panels and panels[0][0] == "ndcg@10":
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
        for ax, (key, lines) in zip(axes[0], panels):
            for tag, by in lines:
                for loss, d in sorted(by.items()):
                    taus = sorted(d)
                    ax.errorbar(taus, [np.mean(d[t]) for t in taus], yerr=[np.std(d[t]) for t in taus],
                                marker="o", capsize=3, label=tag + loss.replace("Loss", ""))
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
            name = run_name(r, several)
            pts = [(int(s["step"]), float(step_loss(s))) for s in r["steps"] if step_loss(s)]
            a1.plot(*zip(*pts), label=name, lw=1)
            tau = [(int(s["step"]), float(s["train/tau"])) for s in r["steps"] if s.get("train/tau")]
            if tau:
                line, = a2.plot(*zip(*tau), label=name, lw=1)
            raw = [(int(s["step"]), float(s["train/tau_raw"])) for s in r["steps"] if s.get("train/tau_raw")]
            if raw:  # ATS's Eq. 12 root before the clamp and the EMA: why tau sits where it does
                a2.plot(*zip(*raw), ls=":", lw=1, color=line.get_color() if tau else None,
                        label=f"{name} raw root (before clamp)")
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
            alone = not several and sum(q["label"] == r["label"] for q in ws) == 1
            name = r["label"] if alone else run_name(r, several)
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


PAIRED_NOTE = ("Per-user differences (model - {base}; each model's value averaged over its seeds). 95% CI: "
               "percentile bootstrap, resampling seeds then users (10,000 replicates). p: two-sided paired "
               "sign-flip permutation test of the mean difference. MDE: the smallest true difference this "
               "run finds with 80% power at alpha 0.05, 2.8 x sd(differences) / sqrt(users). \"no detectable "
               "difference\": the interval covers 0 or p >= 0.05 (few differing users: the two can disagree).")


def write_report(roots: list[Path], out: Path) -> Path:
    """``results.md`` and the PNGs of the runs under ``roots``, into ``out``; the path of ``results.md``."""
    return build_report(roots, out)[0]


def build_report(roots: list[Path], out: Path) -> tuple[Path, list[dict]]:
    """:func:`write_report`, and the failed or unfinished runs it lists (:func:`find_failed`)."""
    runs = [load_run(r) for r in find_runs(roots)]
    failed = find_failed(roots, {r["source"].resolve() for r in runs})
    if not runs:
        listed = "".join(f"\n  {f['dir']}: {f['status']}: {f['error']}" for f in failed)
        listed = f"; failed or unfinished:{listed}" if listed else ""
        raise SystemExit(f"no finished runs (a .hydra/config.yaml beside a metrics.json) under "
                         f"{', '.join(str(r) for r in roots)}{listed}")
    check_rows_agree(runs)
    contexts = group_contexts(runs)
    for r in runs:
        r["contexts"] = [i for i, rs in enumerate(contexts, 1) if any(q is r for q in rs)]
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_all(contexts, out)
    header = (f"{len(runs)} runs from {', '.join(str(r) for r in roots)}, in {len(contexts)} "
              f"context{'s' * (len(contexts) > 1)} (dataset / backbone / decoder / split and users): each is "
              "its own section; relative changes and paired comparisons are within one, on the same users.")
    parts = ["# Results", "", header, ""]
    if failed:
        parts += [f"## Failed or unfinished runs ({len(failed)})", "",
                  "Not in any table below; rerun them (or remove their folders) and make the report again.",
                  "",
                  failed_table(failed), ""]
    for i, rs in enumerate(contexts, 1):
        title = context_title(rs)
        evaluated = all(r["predictions"] for r in rs)
        what = ("Metrics of each evaluation (msl-rec-eval) on these users" if evaluated
                else "Validation metrics of each run's checkpoint with the best monitor.metric")
        what += (f" (in parentheses: relative change against the {BASE} row of the model's own method in this "
                 f"context, LLaRA+{BASE} for LLaRA's other losses; a method's {BASE} row against BIGRec's {BASE}).")
        parts += [f"## C{i}. {title}", "", what, "", results_table(rs), ""]
        method_bases = sorted({lml_base(r["label"]) for r in rs} - {BASE})  # LLaRA+LML, A-LLMRec+LML
        for base in [BASE, *method_bases, "popularity"]:  # every model against BIGRec's LML, each hybrid's losses
            comparisons = paired_comparisons(rs, base, same_method=base in method_bases)  # against its own LML
            if comparisons:
                parts += [f"## Paired comparison with {base} (same users): C{i}", "",
                          PAIRED_NOTE.format(base=base), "", paired_table(comparisons, base), ""]
        tt = tau_table(rs)
        if tt:
            parts += [f"## Metrics against tau (Table 6; mean +- std over seeds): C{i}", "", tt, ""]
    parts += ["## Runs", "", "| run | loss | seed | N@10 | H@10 | distinct #1 titles | context |",
              "| --- |" + " --- |" * 6]
    for r in runs:
        first = distinct_first(r)
        parts.append(f"| `{r['dir'].name}` | {r['label']} | {r['seed']} | "
                     f"{r['metrics'].get('ndcg@10', math.nan):.4f} | {r['metrics'].get('hr@10', math.nan):.4f} | "
                     f"{'' if first is None else first} | {', '.join(f'C{i}' for i in r['contexts'])} |")
    parts += [""] + [f"![{p}]({p})" for p in plots]
    path = out / "results.md"
    path.write_text("\n".join(parts) + "\n")
    return path, failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="sweep or run folders")
    ap.add_argument("--out", type=Path, default=None, help="where results.md and the PNGs go")
    args = ap.parse_args()
    path, failed = build_report(args.dirs, args.out or args.dirs[0])
    print(path.read_text())
    print(f"report: {path}")
    for f in failed:  # said last as well, where a long report does not hide it
        print(f"WARNING: {f['status']} run {f['dir']}: {f['error']}", file=sys.stderr)


if __name__ == "__main__":
    main()
