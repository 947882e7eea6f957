"""Evaluation app: rank a split with a decoder and write predictions.jsonl + metrics.json.

    msl-rec-eval ckpt_path=outputs/train/runs/<t>/checkpoints/last.ckpt   # a checkpoint (+ this config)
    msl-rec-eval run_dir=outputs/train/runs/<t>      # that run's config and best (else last) checkpoint
    msl-rec-eval                                     # the zero-shot backbone
    msl-rec-eval decoder=popularity subset=100       # no model is loaded for popularity/random
    msl-rec-eval split=test dataset.test_file=...    # the held-back split
    msl-rec-eval shard=0/2 hydra.run.dir=outputs/ev/0   # half of the split (run 1/2 elsewhere), then
    msl-rec-eval merge=[outputs/ev/0,outputs/ev/1]   # metrics over both halves' predictions

Outputs go to the run folder (``hydra.run.dir=`` moves it); a one-line table is printed.
Predictions are appended to ``predictions.jsonl`` batch by batch: the same command with the same
``hydra.run.dir=`` resumes after the last written batch (``resume=false`` starts over).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from msl_rec.utils import config as _config  # noqa: F401  (registers ${project_root:})
from msl_rec.utils.config import CONFIG_DIR
from msl_rec.utils.files import write_atomic
from msl_rec.utils.task import task_wrapper

log = logging.getLogger(__name__)

# groups a run_dir's saved config provides (the eval command's own decoder/logger/paths stay)
RUN_KEYS = ("dataset", "backbone", "loss", "seed")


def best_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a training run selected by its ``monitor`` metric (not by file name).

    Read from the run's ``metrics.json`` (``best_ckpt``, written when the fit ends); for a run that
    did not finish, from the monitored ``ModelCheckpoint`` state inside ``checkpoints/last.ckpt``;
    with no validation yet, ``last.ckpt`` itself (with a warning). No checkpoint: a clear error.
    """
    ckpts = run_dir / "checkpoints"
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        best = json.loads(metrics_file.read_text()).get("best_ckpt")
        if best:
            path = run_dir / best if not Path(best).is_absolute() else Path(best)
            if not path.is_file():
                raise FileNotFoundError(f"run_dir={run_dir}: {metrics_file} names best_ckpt={best}, which does not "
                                        "exist; pass ckpt_path= explicitly")
            return path
    last = ckpts / "last.ckpt"
    if not last.is_file():
        raise FileNotFoundError(f"run_dir={run_dir}: no checkpoint (neither best_ckpt in metrics.json nor "
                                f"{last}); was the run trained? pass ckpt_path= explicitly")
    state = torch.load(last, map_location="cpu", weights_only=True).get("callbacks", {})
    for key, cb in state.items():
        if key.startswith("ModelCheckpoint") and cb.get("monitor") and cb.get("best_model_path"):
            path = Path(cb["best_model_path"])
            path = path if path.is_file() else ckpts / path.name  # the run folder may have moved
            if path.is_file():
                log.info("run_dir: best checkpoint by %s: %s", cb["monitor"], path)
                return path
    log.warning("run_dir=%s: no validated best checkpoint recorded; evaluating %s", run_dir, last)
    return last


def command_line_overrides() -> list[str]:
    """This command's Hydra task overrides (``[]`` outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    except ValueError:  # HydraConfig set without overrides
        return []


def run_choice(saved: DictConfig, group: str) -> str | None:
    """The option of config group ``group`` a saved run config was composed with (by its name)."""
    from msl_rec.utils.registry import LOSSES

    node = saved.get(group)
    if node is None:
        return None
    if group == "loss":
        return LOSSES.get(node.get("_target_"))
    return node.get("name")


def apply_run_dir(cfg: DictConfig, overrides: list[str] | None = None) -> DictConfig:
    """Take dataset/backbone/loss/seed from ``cfg.run_dir``'s saved config, and its best checkpoint.

    The command line still wins: a value override of those keys (``dataset.valid_file=...``) is
    applied on top of the run's config; a group override (``dataset=toy``) would evaluate the model
    on another catalog and is an error.
    """
    run_dir = Path(cfg.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir={cfg.run_dir}: no such folder; give a training run folder, e.g. "
                                "outputs/train/runs/<time>")
    saved_file = run_dir / ".hydra" / "config.yaml"
    if not saved_file.is_file():
        raise FileNotFoundError(f"run_dir={run_dir}: no {saved_file} (not a msl-rec-train run folder); "
                                "give a folder under outputs/train/runs/ or ckpt_path=")
    saved = OmegaConf.load(saved_file)
    from msl_rec.utils.registry import check_targets

    check_targets(saved, source=str(saved_file))  # a file is data: only allowlisted classes, before use
    overrides = command_line_overrides() if overrides is None else overrides
    mine = []
    for ov in overrides:
        key = ov.split("=", 1)[0].lstrip("+~")
        if key.split(".", 1)[0] not in RUN_KEYS:
            continue
        if "." not in key and key != "seed":
            if ov.split("=", 1)[1] == run_choice(saved, key):
                continue  # the run's own option: nothing to change
            raise ValueError(f"run_dir={run_dir} takes {key} from the run, but the command line has {ov!r}: a model "
                             f"trained on that run's {key} cannot be evaluated as another one; override single keys "
                             f"(e.g. {key}.<key>=...) or drop run_dir=")
        mine.append(ov.lstrip("+"))
    with open_dict(cfg):
        for key in RUN_KEYS:
            if key in saved:
                cfg[key] = saved[key]
        for ov in mine:  # the command line wins over the saved run
            key, value = ov.split("=", 1)
            OmegaConf.update(cfg, key, OmegaConf.from_dotlist([f"v={value}"]).v, force_add=True)
        if not cfg.get("ckpt_path"):
            cfg.ckpt_path = str(best_checkpoint(run_dir))
    if mine:
        log.info("run_dir=%s with command-line overrides on top: %s", run_dir, ", ".join(mine))
    return cfg


def shard_range(n_rows: int, shard: str | None) -> range:
    """Rows of shard ``"i/n"``: the i-th (0-based) of n contiguous, near-equal slices of ``n_rows``."""
    if shard is None:
        return range(n_rows)
    try:
        i, n = (int(x) for x in str(shard).split("/"))
    except ValueError:
        raise ValueError(f"shard={shard!r}: expected 'i/n' with integers, e.g. shard=0/2") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard={shard!r}: need 0 <= i < n")
    return range(i * n_rows // n, (i + 1) * n_rows // n)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def eval_key(cfg: DictConfig, rows: range, decoder=None) -> dict[str, Any]:
    """What decides an evaluation's predictions; a resumed run must have the same key, and merged
    evaluations the same key but for ``rows``.

    The model is keyed by its checkpoint's content (SHA-256), not its path: a checkpoint replaced in
    place is another model. The data by content too (split, catalog and, for popularity and the
    sampled negatives, the training file), with the prompt settings; the decoder by its settings and
    the dtype it computes in (:func:`decode_dtype`). The batch size is not in it: predictions do not
    depend on it.
    """
    split_file = cfg.dataset.get(f"{cfg.split}_file")
    train_file = cfg.dataset.get("train_file")
    ckpt = cfg.get("ckpt_path")
    d = cfg.dataset
    decoder_cfg = OmegaConf.to_container(cfg.decoder, resolve=True)
    decoder_cfg.pop("top_k", None)  # cut-offs change metrics, not predictions
    if decoder is not None and hasattr(decoder, "max_new_tokens"):
        decoder_cfg["max_new_tokens"] = int(decoder.max_new_tokens)  # null resolved from the catalog
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    return {"split": cfg.split, "file": str(split_file), "file_sha256": file_sha256(split_file),
            "rows": [rows.start, rows.stop],
            "ckpt_sha256": file_sha256(ckpt) if ckpt else None, "ckpt_path": str(ckpt) if ckpt else None,
            "backbone": {k: backbone.get(k) for k in ("name", "source", "model", "seed", "dtype", "lora", "tokenizer")},
            "prompt": {k: d.get(k) for k in ("instruction", "input_prefix", "cutoff_len")},
            "decoder": decoder_cfg, "dtype": decode_dtype(decoder),
            "list_len": getattr(decoder, "num_beams", getattr(decoder, "num_results", None)),
            "item_file_sha256": file_sha256(d.item_file),
            "train_file_sha256": file_sha256(train_file) if train_file and Path(train_file).is_file() else None,
            "scoring": OmegaConf.to_container(cfg.scoring, resolve=True) if cfg.get("scoring") else None}


def decode_dtype(decoder) -> str | None:
    """The floating-point type the decoder's model computes in (``"float32"``), None without a model."""
    if decoder is None or not getattr(decoder, "needs_model", True):
        return None
    dtype = getattr(decoder, "compute_dtype", None)
    dtype = dtype() if callable(dtype) else dtype
    return str(dtype).removeprefix("torch.") if dtype is not None else None


KEY_IGNORED_ON_RESUME = ("ckpt_path",)  # the same content under another path is the same model


def key_differences(saved: dict, key: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """The keys in which two eval keys differ (``[]`` if they agree), as ``key: saved -> new``."""
    out = []
    for k in sorted(set(saved) | set(key)):
        if k in ignore or saved.get(k) == key.get(k):
            continue
        out.append(f"{k}: {json.dumps(saved.get(k))[:80]} -> {json.dumps(key.get(k))[:80]}")
    return out


def check_predictions(files: list[Path], expected: dict[int, tuple[int, int]]) -> dict[int, dict]:
    """Prediction rows of ``files`` by split row, checked against the split: ``expected[row] =
    (user_id, target_id)``. A duplicated row, a row outside ``expected``, a user or target that is not
    the split's at that row, or (in ``predictions.jsonl``, always written in row order) a row out of
    order is an error naming the file and line. A torn last line (a kill mid-write) is dropped."""
    from msl_rec.decoding import load_predictions

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
            if path.name == "predictions.jsonl" and row < last:
                raise ValueError(f"{where}: row {row} after row {last} (out of order); rerun with resume=false")
            last = row
            seen[row] = (path, line)
            out[row] = p
    return out


def fold_predictions(out_dir: Path, expected: dict[int, tuple[int, int]]) -> list[dict]:
    """Fold ``predictions.jsonl`` and any per-rank part files into one checked ``predictions.jsonl``
    in row order (a temporary file renamed over it, so a kill never loses what was written)."""
    from msl_rec.decoding.engine import PART_GLOB
    main = out_dir / "predictions.jsonl"
    parts = sorted(out_dir.glob(PART_GLOB))
    done = check_predictions(([main] if main.is_file() else []) + parts, expected)
    rows = [done[r] for r in sorted(done)]
    write_atomic(main, "".join(json.dumps(p) + "\n" for p in rows))
    for part in parts:
        part.unlink()
    return rows


def resume_predictions(out_dir: Path, key: dict[str, Any], resume: bool, expected: dict[int, tuple[int, int]],
                       write: bool = True) -> list[dict]:
    """Prediction rows already written to ``out_dir`` by the same evaluation (``[]`` to start over).

    Only ``write=True`` (rank 0) touches the folder: it checks and folds the saved rows and writes
    ``eval_key.json``; the other ranks read what rank 0 left.
    """
    from msl_rec.decoding.engine import PART_GLOB
    pred_file, key_file = out_dir / "predictions.jsonl", out_dir / "eval_key.json"
    saved_any = pred_file.is_file() or any(out_dir.glob(PART_GLOB))
    if not write:
        return fold_predictions_readonly(out_dir, expected) if resume and saved_any else []
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


def fold_predictions_readonly(out_dir: Path, expected: dict[int, tuple[int, int]]) -> list[dict]:
    from msl_rec.decoding.engine import PART_GLOB

    main = out_dir / "predictions.jsonl"
    files = ([main] if main.is_file() else []) + sorted(out_dir.glob(PART_GLOB))
    return list(check_predictions(files, expected).values())


def check_mergeable(folders: list[Path]) -> list[tuple[int, int]]:
    """The row ranges of evaluations that may be merged: same eval key but for ``rows``, no
    overlapping rows (an error), gaps only warned about. Returns the ranges in folder order."""
    keys = []
    for f in folders:
        key_file = f / "eval_key.json"
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


def merge_app(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``merge=[dir, ...]``: one predictions.jsonl and metrics.json over several evaluations."""
    from msl_rec.decoding import merge_predictions
    folders = [Path(f) for f in cfg.merge]
    if len(folders) < 2:
        raise ValueError(f"merge={list(cfg.merge)}: merging needs at least two evaluation folders (the shards of one "
                         "evaluation); one folder's metrics.json already holds its metrics")
    for f in folders:
        if not (f / "predictions.jsonl").is_file():
            raise FileNotFoundError(f"merge: {f / 'predictions.jsonl'} does not exist")
    ranges = check_mergeable(folders)
    key = read_json(folders[0] / "eval_key.json")
    from msl_rec.decoding import validate_top_k

    list_len = key.get("list_len")
    if list_len is not None and max(validate_top_k(cfg.top_k)) > list_len:  # top_k within the shards' lists
        raise ValueError(f"merge: top_k={list(cfg.top_k)} asks for K={max(cfg.top_k)} but the merged evaluations "
                         f"ranked {list_len} items per user (HR@K would equal HR@{list_len}); lower top_k")
    result = merge_predictions(folders, top_k=tuple(cfg.top_k))
    for f, (lo, hi) in zip(folders, ranges):
        n = sum(1 for p in result.predictions if lo <= p.get("row", -1) < hi)
        if n != hi - lo:
            raise ValueError(f"merge: {f} holds {n} of its {hi - lo} rows [{lo}, {hi}); finish it first "
                             "(rerun its command: it resumes)")
    out_dir = Path(cfg.paths.output_dir)
    metrics = {f"{cfg.split}/{k}": float(v) for k, v in result.metrics.items()}
    result.metrics.update(eval_record(key, len(result.predictions)))
    result.save(out_dir)
    key["rows"] = sorted([list(r) for r in ranges])
    key["merged_from"] = [str(f) for f in folders]
    write_atomic(out_dir / "eval_key.json", json.dumps(key, indent=1) + "\n")
    line = f"merged {len(folders)} {cfg.split} n={len(result.predictions)}  " + format_table(result.metrics)
    print(line)
    (out_dir / "summary.txt").write_text(line + "\n")
    return metrics, {"result": result}


def read_json(path: Path) -> Any:
    """A JSON file's content; a truncated or invalid file is an error naming it."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); it was cut off or edited: "
                         "rerun the command that wrote it (or remove the folder)") from None


def eval_record(key: dict[str, Any], n_users: int, num_negatives: int | None = None) -> dict[str, Any]:
    """What metrics.json says beside the metrics: how they were computed (from the eval key):
    users, split, decoder, the dtype the model computed in, the checkpoint's SHA-256 and the number of
    sampled titles ``target_rank_sampled`` ranks the target among (0: none)."""
    if num_negatives is None:
        scoring = key.get("scoring") or {}
        uses_model = key.get("dtype") is not None
        num_negatives = int(scoring.get("num_negatives", 0)) if uses_model and scoring.get("target_logp", True) else 0
    return {"n_users": int(n_users), "split": key.get("split"), "decoder": (key.get("decoder") or {}).get("name"),
            "dtype": key.get("dtype"), "ckpt_sha256": key.get("ckpt_sha256"), "num_negatives": int(num_negatives)}


def count_undecodable_targets(decoder, catalog, targets: list[int]) -> int:
    """Users whose target title is longer than the decoder's ``max_new_tokens`` and so can never be
    ranked; all of them is an error (every metric would be 0 for a reason that is not the model)."""
    limit = getattr(decoder, "max_new_tokens", None)
    if limit is None:
        return 0
    n = sum(len(catalog.sequences[catalog.item_seq[t]]) > limit for t in targets)
    if n == len(targets):
        raise ValueError(f"decoder.max_new_tokens={limit}: the target title of every one of the {n} users is longer "
                         "than that, so no target can be ranked; leave decoder.max_new_tokens=null (the catalog's "
                         "longest title) or raise it")
    if n:
        log.warning("decoder.max_new_tokens=%d: %d of %d users' target titles are longer and can never be ranked "
                    "(they count as misses)", limit, n, len(targets))
    return n


def format_table(metrics: dict[str, Any]) -> str:
    metrics = {k: v for k, v in metrics.items() if isinstance(v, float)}
    keys = sorted(metrics, key=lambda k: (k.split("@")[0], int(k.split("@")[1]) if "@" in k else 0))
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys)


def eval_trainer(cfg: DictConfig, callbacks: list) -> L.Trainer:
    """A Trainer for ``predict`` from ``cfg.trainer`` (``trainer=ddp_sim``, ``trainer.devices=N``):
    no logger, no checkpoints; the model's own dtype unless ``trainer.precision`` names one."""
    tcfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    tcfg["precision"] = tcfg.get("precision") or "32-true"
    if cfg.get("device", "auto") == "cpu":
        tcfg["accelerator"] = "cpu"
    strategy = tcfg.get("strategy")
    if isinstance(strategy, dict):
        if "FSDP" in str(strategy.get("_target_", "")):
            raise ValueError("msl-rec-eval: FSDP is for training; evaluate with trainer=ddp (each rank holds the model)")
        tcfg["strategy"] = hydra.utils.instantiate(strategy)
    return hydra.utils.instantiate(tcfg, callbacks=callbacks, logger=False, enable_checkpointing=False,
                                   inference_mode=False, _convert_="partial")


def global_rank() -> int:
    """This process's rank, known before the Trainer exists (Lightning's launchers set the env)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0))


def length_sorted_batches(rows: list[int], prompt_len: list[int], batch_size: int) -> list[list[int]]:
    """``rows`` grouped into batches of similar prompt length (less left padding); ties by row."""
    order = sorted(rows, key=lambda r: (prompt_len[r], r))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


@task_wrapper
def evaluate_app(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    from msl_rec.decoding import build_decoder, decoder_settings, needs_train_targets
    from msl_rec.decoding.engine import BatchList, EvalPredictor, PredictionWriter, progress_callbacks
    from msl_rec.decoding.evaluate import EvalResult, summarize
    from msl_rec.decoding.scoring import TargetScorer
    from msl_rec.models.module import RecLitModule
    from msl_rec.train import build_data

    if cfg.get("merge"):
        return merge_app(cfg)
    if cfg.get("run_dir"):
        cfg = apply_run_dir(cfg)  # a folder that is not a run: an error naming the missing config
    from msl_rec.utils.registry import check_targets

    check_targets(cfg, source="the evaluation config")
    L.seed_everything(int(cfg.seed), workers=True)
    split = cfg.split
    if split not in ("valid", "test"):
        raise ValueError(f"split: {split!r} (valid, test)")
    if cfg.get("subset") is not None:  # `subset=N` wins over a preset's data.<split>_subset
        if isinstance(cfg.subset, bool) or not isinstance(cfg.subset, int) or cfg.subset < 1:
            raise ValueError(f"subset={cfg.subset!r}: expected a whole number >= 1 (the first N {split} rows)")
        with open_dict(cfg):
            cfg.data[f"{split}_subset"] = cfg.subset
    decoder_settings(cfg.decoder, cfg.top_k)  # bad top_k / decoder settings: an error before any loading
    _, catalog, dm = build_data(cfg)
    dm.setup("validate" if split == "valid" else "test")
    if needs_train_targets(cfg.decoder):  # popularity counts the training targets, whatever the split
        if not cfg.dataset.get("train_file"):
            raise ValueError(f"decoder={cfg.decoder.name} needs dataset.train_file (it ranks by training targets)")
        dm.setup("fit")
    dataset = dm.eval_dataloader(split).dataset
    n_split = len(dataset)
    rows = shard_range(n_split, cfg.get("shard"))
    if len(rows) == 0:
        raise ValueError(f"shard={cfg.get('shard')} selects no rows of the {n_split} {split} rows (n=0): "
                         "use fewer shards")
    expected = {r: (dataset.encoded[r].sample.user_id, dataset.encoded[r].sample.target) for r in rows}
    decoder = build_decoder(OmegaConf.to_container(cfg.decoder, resolve=True), catalog,
                            train_targets=dm.train_targets or None, top_k=cfg.top_k)
    n_undecodable = count_undecodable_targets(decoder, catalog, [t for _, t in expected.values()])
    out_dir = Path(cfg.paths.output_dir)
    rank = global_rank()
    key = eval_key(cfg, rows, decoder)
    done = resume_predictions(out_dir, key, bool(cfg.get("resume", True)), expected, write=rank == 0)
    if done:
        log.info("resuming: %d of %d users already in %s", len(done), len(rows), out_dir / "predictions.jsonl")

    model, module = None, None
    if getattr(decoder, "needs_model", True):
        if cfg.get("ckpt_path"):
            from msl_rec.models.checkpoint import check_checkpoint_backbone

            check_checkpoint_backbone(cfg.ckpt_path, cfg.backbone)
            module = RecLitModule.load_from_checkpoint(cfg.ckpt_path, map_location="cpu")
            log.info("loaded %s", cfg.ckpt_path)
        else:
            module = RecLitModule(backbone=OmegaConf.to_container(cfg.backbone, resolve=True),
                                  loss=OmegaConf.to_container(cfg.loss, resolve=True))
            module.configure_model()
            log.info("zero-shot backbone %s", cfg.backbone.name)
        model = module.model.eval()
    scoring = OmegaConf.to_container(cfg.scoring, resolve=True) if cfg.get("scoring") else None
    scorer = TargetScorer.for_decoder(decoder, catalog, scoring) if model is not None else None

    # decode the rows not yet written, in batches of similar prompt length (keyed by row, so the
    # order changes nothing in the results); on N processes each rank takes every N-th batch
    done_rows = {p["row"] for p in done}
    prompt_len = {r: len(dataset.encoded[r].prompt_ids) for r in rows}
    todo = length_sorted_batches([r for r in rows if r not in done_rows], prompt_len, dm.eval_batch_size)
    predictor = EvalPredictor(decoder, model, catalog, scorer)
    from msl_rec.utils.signals import StopPredictionOnSigterm

    # after the writer: a SIGTERM stops once the current batch is written (exit 143; rerun to continue);
    # the progress bar counts users (users/s, ETA), not batches
    trainer = eval_trainer(cfg, [PredictionWriter(out_dir, todo), StopPredictionOnSigterm(),
                                 *progress_callbacks(cfg.trainer, todo)])
    if todo:
        trainer.predict(predictor, dataloaders=BatchList(dm, split, todo).loader(), return_predictions=False)
        trainer.strategy.barrier("predictions written")
    if not trainer.is_global_zero:
        return {}, {}
    predictions = fold_predictions(out_dir, expected)
    if len(predictions) != len(rows):
        missing = sorted(set(rows) - {p["row"] for p in predictions})
        raise RuntimeError(f"{out_dir / 'predictions.jsonl'}: {len(missing)} of {len(rows)} rows have no prediction "
                           f"(first: {missing[:5]}); rerun the same command to resume")
    result = EvalResult(metrics=summarize(predictions, tuple(cfg.top_k)), predictions=predictions,
                        ranks=np.asarray([p["rank"] for p in predictions], dtype=np.int64))
    record = eval_record(key, len(predictions), num_negatives=scorer.num_negatives if scorer is not None else 0)
    record["n_undecodable_targets"] = n_undecodable
    write_atomic(out_dir / "metrics.json", json.dumps({**result.metrics, **record}, indent=2) + "\n")
    device = predictor.device

    def batches(row_range: range):
        for b in dm.eval_dataloader(split, row_range):
            yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}

    if cfg.get("save_w") and model is not None:
        # Fig. 5: the paper's w at the positive token, per response position of the evaluated users,
        # at tau 1: w_lml = 1 - P(y) (full softmax), w_msl = 1 - P_valid(y) (softmax over the valid set)
        with torch.no_grad():
            parts = [module.valid_weights(b) for b in batches(rows)]
        w = {k: torch.cat([p[k] for p in parts]).cpu().numpy() for k in ("w_lml", "w_msl", "num_valid")}
        np.savez(out_dir / "w_values.npz", **w, tau=np.float64(1.0))
        multi = w["num_valid"] > 1
        log.info("w at tau 1 over %d response positions with > 1 valid token: LML (1 - P) mean %.4f, "
                 "MSL (1 - P_valid) mean %.4f", int(multi.sum()), float(w["w_lml"][multi].mean()),
                 float(w["w_msl"][multi].mean()))
    metrics = {f"{split}/{k}": float(v) for k, v in result.metrics.items()}
    result.metrics.update(record)

    from msl_rec.utils.dashboard import log_evaluation

    # logger=wandb: an eval run in the evaluated training run's group, named <its name>/eval-<split>
    log_evaluation(cfg, out_dir, metrics, record)
    line = f"{cfg.decoder.name} {split} n={len(result.predictions)}  " + format_table(result.metrics)
    print(line)
    (out_dir / "summary.txt").write_text(line + "\n")
    return metrics, {"result": result}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval.yaml")
def hydra_main(cfg: DictConfig) -> None:
    evaluate_app(cfg)


def main() -> None:
    hydra_main()


if __name__ == "__main__":
    main()
