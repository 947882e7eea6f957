"""The prediction store: an evaluation folder's ``predictions.jsonl`` (one row per user) and its key.

Written batch by batch: each rank appends its rows, keyed by split ``row``, to
``predictions.part<rank>.jsonl`` (:func:`append_rows`); rank 0 folds the parts into one
``predictions.jsonl`` in row order (:func:`fold_predictions`), at the end and at the start of a
resumed run. ``eval_key.json`` beside it (:mod:`msl_rec.evaluation.key`) says which evaluation wrote
them: a resume or a merge of another evaluation is an error. :func:`load_predictions` is the one
reader of a predictions file.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from msl_rec.evaluation.evaluate import EvalResult
from msl_rec.evaluation.key import KEY_IGNORED_ON_RESUME, eval_record, key_differences, read_json
from msl_rec.utils.files import write_atomic

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
KEY_FILE = "eval_key.json"
PART_GLOB = "predictions.part*.jsonl"

Expected = dict[int, tuple[int, int]]  # split row -> (user_id, target_id)


def load_predictions(path: str | Path) -> list[dict]:
    """The rows of a predictions file; a torn last line (an interrupted write) is dropped; a line that
    is not JSON elsewhere, or a row without ``rank``, is an error naming the file and line."""
    path = Path(path)
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
        if "rank" not in row:
            raise ValueError(f"{path}: line {i + 1} has no 'rank' field")
        rows.append(row)
    return rows


def append_rows(out_dir: Path, rank: int, rows: Sequence[int], predictions: Sequence[dict]) -> None:
    """Append one batch's prediction rows, each with its split ``row``, to rank ``rank``'s part file."""
    if len(rows) != len(predictions):
        raise RuntimeError(f"{len(predictions)} predictions for {len(rows)} rows")
    with open(out_dir / f"predictions.part{rank}.jsonl", "a", encoding="utf-8") as f:
        f.writelines(json.dumps({"row": int(r), **p}) + "\n" for r, p in zip(rows, predictions))
        f.flush()


def check_predictions(files: list[Path], expected: Expected) -> dict[int, dict]:
    """Prediction rows of ``files`` by split row, checked against the split: ``expected[row] =
    (user_id, target_id)``. A duplicated row, a row outside ``expected``, a user or target that is not
    the split's at that row, or (in ``predictions.jsonl``, always written in row order) a row out of
    order is an error naming the file and line. A torn last line (a kill mid-write) is dropped."""
    seen: dict[int, tuple[Path, int]] = {}
    out: dict[int, dict] = {}
    for path in files:
        last = -1
        for line, p in enumerate(load_predictions(path), start=1):
            where = f"{path}: line {line}"
            if "row" not in p:
                raise ValueError(f"{where} has no 'row' (written by an older msl-rec); rerun with resume=false")
            row = int(p["row"])
            if row in seen:
                raise ValueError(f"{where}: row {row} again (first at {seen[row][0]}: line {seen[row][1]}); "
                                 "the file was edited or appended twice; rerun with resume=false")
            if row not in expected:
                raise ValueError(f"{where}: row {row} is not one of this evaluation's rows")
            if (int(p["user_id"]), int(p["target_id"])) != expected[row]:
                raise ValueError(f"{where}: row {row} has user {p['user_id']} / target {p['target_id']} but the "
                                 f"split has user {expected[row][0]} / target {expected[row][1]} there")
            if path.name == PREDICTIONS and row < last:
                raise ValueError(f"{where}: row {row} after row {last} (out of order); rerun with resume=false")
            last = row
            seen[row] = (path, line)
            out[row] = p
    return out


def _files(out_dir: Path) -> list[Path]:
    main = out_dir / PREDICTIONS
    return ([main] if main.is_file() else []) + sorted(out_dir.glob(PART_GLOB))


def fold_predictions(out_dir: Path, expected: Expected) -> list[dict]:
    """Fold ``predictions.jsonl`` and any per-rank part files into one checked ``predictions.jsonl``
    in row order (a temporary file renamed over it, so a kill never loses what was written)."""
    parts = sorted(out_dir.glob(PART_GLOB))
    done = check_predictions(_files(out_dir), expected)
    rows = [done[r] for r in sorted(done)]
    write_atomic(out_dir / PREDICTIONS, "".join(json.dumps(p) + "\n" for p in rows))
    for part in parts:
        part.unlink()
    return rows


def resume_predictions(out_dir: Path, key: dict[str, Any], resume: bool, expected: Expected,
                       write: bool = True) -> list[dict]:
    """Prediction rows already written to ``out_dir`` by the same evaluation (``[]`` to start over).

    Only ``write=True`` (rank 0) touches the folder: it checks the saved key, folds the saved rows and
    writes ``eval_key.json``; the other ranks read what rank 0 left.
    """
    pred_file, key_file = out_dir / PREDICTIONS, out_dir / KEY_FILE
    saved_any = pred_file.is_file() or any(out_dir.glob(PART_GLOB))
    if not write:
        return list(check_predictions(_files(out_dir), expected).values()) if resume and saved_any else []
    out_dir.mkdir(parents=True, exist_ok=True)
    if resume and saved_any:
        if not key_file.is_file():
            raise ValueError(f"{pred_file} has no {key_file} beside it (written by an older msl-rec or another "
                             "tool); use another hydra.run.dir= or resume=false to overwrite it")
        diff = key_differences(read_json(key_file), key, ignore=KEY_IGNORED_ON_RESUME)
        if diff:
            raise ValueError(f"{pred_file} was written by a different evaluation ({key_file} differs in "
                             f"{'; '.join(diff)}); use another hydra.run.dir= or resume=false to overwrite it")
        done = fold_predictions(out_dir, expected)
    else:
        for f in [pred_file, *out_dir.glob(PART_GLOB)]:
            f.unlink(missing_ok=True)
        done = []
    write_atomic(key_file, json.dumps(key, indent=1) + "\n")
    return done


def check_mergeable(folders: list[Path]) -> list[tuple[int, int]]:
    """The row ranges of evaluations that may be merged: same eval key but for ``rows``, no
    overlapping rows (an error), gaps only warned about. Returns the ranges in folder order."""
    keys = []
    for f in folders:
        key_file = f / KEY_FILE
        if not key_file.is_file():
            raise FileNotFoundError(f"merge: {key_file} does not exist (not an msl-rec-eval folder)")
        keys.append(read_json(key_file))
    for f, key in zip(folders[1:], keys[1:]):
        diff = key_differences(keys[0], key, ignore=("rows", *KEY_IGNORED_ON_RESUME))
        if diff:
            raise ValueError(f"merge: {f} is a different evaluation from {folders[0]} (eval_key.json differs in "
                             f"{'; '.join(diff)}); only shards of one evaluation can be merged")
    ranges = [tuple(k["rows"]) for k in keys]
    order = sorted(range(len(folders)), key=lambda i: ranges[i])
    for a, b in itertools.pairwise(order):
        if ranges[b][0] < ranges[a][1]:
            raise ValueError(f"merge: rows {list(ranges[a])} of {folders[a]} and {list(ranges[b])} of {folders[b]} "
                             "overlap; users would be counted twice")
    gaps = [(ranges[a][1], ranges[b][0]) for a, b in itertools.pairwise(order) if ranges[b][0] > ranges[a][1]]
    if gaps:
        log.warning("merge: rows %s are in none of the merged evaluations",
                    ", ".join(f"[{lo}, {hi})" for lo, hi in gaps))
    return ranges


def merge_shards(folders: Sequence[str | Path], top_k: Sequence[int], out_dir: Path) -> tuple[EvalResult, dict]:
    """One ``predictions.jsonl``, ``metrics.json`` and ``eval_key.json`` in ``out_dir`` from the
    shards of one evaluation (``msl-rec-eval merge=[dir, ...]``); metrics are recomputed over all
    users, not averaged. Folders that are not finished shards of one evaluation are an error.
    Returns the result and the record written beside its metrics (:func:`eval_record`)."""
    folders = [Path(f) for f in folders]
    if len(folders) < 2:
        raise ValueError(f"merge={[str(f) for f in folders]}: merging needs at least two evaluation folders (the "
                         "shards of one evaluation); one folder's metrics.json already holds its metrics")
    for f in folders:
        if not (f / PREDICTIONS).is_file():
            raise FileNotFoundError(f"merge: {f / PREDICTIONS} does not exist")
    ranges = check_mergeable(folders)
    key = read_json(folders[0] / KEY_FILE)
    list_len = key.get("list_len")
    if list_len is not None and max(top_k) > list_len:  # top_k within the shards' lists
        raise ValueError(f"merge: top_k={list(top_k)} asks for K={max(top_k)} but the merged evaluations "
                         f"ranked {list_len} items per user (HR@K would equal HR@{list_len}); lower top_k")
    predictions = []
    for f in folders:
        rows = load_predictions(f / PREDICTIONS)
        if any("row" not in p for p in rows):
            raise ValueError(f"merge: {f / PREDICTIONS} has rows without 'row' (written by an older msl-rec); "
                             "re-evaluate that shard")
        predictions += rows
    predictions.sort(key=lambda p: p["row"])
    for f, (lo, hi) in zip(folders, ranges):
        n = sum(1 for p in predictions if lo <= p["row"] < hi)
        if n != hi - lo:
            raise ValueError(f"merge: {f} holds {n} of its {hi - lo} rows [{lo}, {hi}); finish it first "
                             "(rerun its command: it resumes)")
    result = EvalResult.of(predictions, top_k)
    record = eval_record(key, len(predictions))
    save_evaluation(out_dir, result, record)
    key["rows"] = sorted([list(r) for r in ranges])
    key["merged_from"] = [str(f) for f in folders]
    write_atomic(out_dir / KEY_FILE, json.dumps(key, indent=1) + "\n")
    return result, record


def save_evaluation(out_dir: Path, result: EvalResult, record: dict[str, Any]) -> None:
    """``predictions.jsonl`` (row order) and ``metrics.json`` (the metrics, then ``record``) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / PREDICTIONS, "".join(json.dumps(p) + "\n" for p in result.predictions))
    write_atomic(out_dir / "metrics.json", json.dumps({**result.metrics, **record}, indent=2) + "\n")
