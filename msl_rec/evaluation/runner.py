"""Running an evaluation: which rows and checkpoint (``run_dir=``, ``shard=``), in which batches, on
which Trainer, and :func:`evaluate` for a decoder over batches in this process."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm.auto import tqdm

from msl_rec.data.build import build_data
from msl_rec.decoding import decoder_settings, needs_train_targets
from msl_rec.evaluation.evaluate import EvalResult
from msl_rec.evaluation.predict import BatchPredictor
from msl_rec.models.checkpoint import read_checkpoint
from msl_rec.utils.config import plain
from msl_rec.utils.registry import LOSSES, SEQUENTIAL_MODELS, check_targets
from msl_rec.utils.schema import RunConfig

log = logging.getLogger(__name__)

# groups a run_dir's saved config provides (the eval command's own decoder/logger/paths stay)
RUN_KEYS = ("method", "model", "dataset", "backbone", "loss", "seed")


# ---------------------------------------------------------------------------- in one process
def evaluate(decoder, model, batches: Iterable[dict], catalog, top_k: Sequence[int] = (1, 5, 10),
             progress: bool = False, on_batch: Callable[[list[dict]], None] | None = None,
             total: int | None = None, scoring: Mapping | None = None,
             preamble_ids: Sequence[int] | None = None) -> EvalResult:
    """Rank every batch's users with ``decoder`` (:class:`BatchPredictor`) and :func:`summarize` them.

    ``scoring``: the ``scoring:`` settings (``target_logp``, ``num_negatives``, ``seed``,
    ``chunk_size``). The model runs in eval mode under ``torch.no_grad``; its previous training mode is
    restored afterwards. ``on_batch`` gets each batch's prediction rows as soon as they exist.
    ``preamble_ids``: the prompt start shared by every prompt (``RecDataModule.prompt_preamble``).
    """
    predictor = BatchPredictor(decoder, catalog, scoring, preamble_ids)
    if predictor.needs_model and model is None:
        raise ValueError(f"{type(decoder).__name__} needs a model, got None")
    if progress:
        batches = tqdm(batches, desc="evaluate", unit="batch", total=total)
    was_training = bool(getattr(model, "training", False))
    if model is not None:
        model.eval()
    predictions = []
    try:
        with torch.no_grad() if model is not None else contextlib.nullcontext():
            for batch in batches:
                rows = predictor.predict(model, batch)
                predictions.extend(rows)
                if on_batch is not None:
                    on_batch(rows)
    finally:
        if model is not None and was_training:
            model.train()
    return EvalResult.of(predictions, top_k)


# ---------------------------------------------------------------------------- run_dir=
def best_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a training run selected by its ``monitor`` metric (not by file name).

    Read from the run's ``metrics.json`` (``best_ckpt``, written when the fit ends); for a run that
    did not finish, from the monitored ``ModelCheckpoint`` state inside ``checkpoints/last.ckpt``;
    with no validation yet, ``last.ckpt`` itself (with a warning). No checkpoint: a clear error.
    """
    run_dir = Path(run_dir)
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
        saved = run_dir / ".hydra" / "config.yaml"
        if saved.is_file() and OmegaConf.select(OmegaConf.load(saved), "trainer.fast_dev_run", default=False):
            raise FileNotFoundError(f"run_dir={run_dir}: a debug=fdr run (trainer.fast_dev_run), which saves no "
                                    "checkpoint; train with debug=limit (a few batches, checkpoints saved) to evaluate it")
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
    try:
        return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    except ValueError:  # HydraConfig set without overrides
        return []


def run_choice(saved: Mapping, group: str) -> str | None:
    """The option of config group ``group`` a saved run config (or a checkpoint's hyper-parameters) was composed
    with (by its name)."""
    node = saved.get(group)
    if node is None:
        return None
    if group == "loss":
        return LOSSES.get(node.get("_target_"))
    if group == "model":
        return SEQUENTIAL_MODELS.get(node.get("_target_"))
    return node.get("name")


def _values_on_top(overrides: list[str], keys: Sequence[str], saved: Any,
                   refuse: Callable[[str, str], Exception]) -> list[str]:
    """The command line's single-key overrides (``loss.tau=1.5``) of the groups ``keys`` a saved model provides, to
    apply on top of its settings; a group override naming another option than the saved one (``loss=lml`` for an
    MSL model) raises ``refuse(group, override)``; naming the saved one is nothing to change."""
    mine = []
    for ov in overrides:
        key = ov.split("=", 1)[0].lstrip("+~")
        if key.split(".", 1)[0] not in keys:
            continue
        if "." not in key and key != "seed":
            if ov.split("=", 1)[1] == run_choice(saved, key):
                continue
            raise refuse(key, ov)
        mine.append(ov.lstrip("+"))
    return mine


def _apply_values(cfg: DictConfig, overrides: list[str]) -> None:
    for ov in overrides:
        key, value = ov.split("=", 1)
        OmegaConf.update(cfg, key, OmegaConf.from_dotlist([f"v={value}"]).v, force_add=True)


def apply_run_dir(cfg: DictConfig, overrides: list[str] | None = None) -> DictConfig:
    """Take method/model/dataset/backbone/loss/seed from ``cfg.run_dir``'s saved config, and its best checkpoint
    (a sequential run also its decoder, unless the command line names one).

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
    check_targets(saved, source=str(saved_file))  # a file is data: only allowlisted classes, before use
    overrides = command_line_overrides() if overrides is None else overrides
    mine = _values_on_top(overrides, RUN_KEYS, saved, lambda key, ov: ValueError(
        f"run_dir={run_dir} takes {key} from the run, but the command line has {ov!r}: a model trained on that "
        f"run's {key} cannot be evaluated as another one; override single keys (e.g. {key}.<key>=...) or drop run_dir="))
    with open_dict(cfg):
        for key in RUN_KEYS:
            if key in saved:
                cfg[key] = _typed_like(key, saved[key])
        _apply_values(cfg, mine)  # the command line wins over the saved run
        if not cfg.get("ckpt_path"):
            cfg.ckpt_path = str(best_checkpoint(run_dir))
        # a sequential run ranks with the decoder it was validated with, unless the command line names one
        if (saved.get("method") or {}).get("kind") == "sequential" and not any(
                ov.split("=", 1)[0].lstrip("+~") == "decoder" for ov in overrides):
            cfg.decoder = saved.decoder
    if mine:
        log.info("run_dir=%s with command-line overrides on top: %s", run_dir, ", ".join(mine))
    return cfg


def apply_checkpoint(cfg: DictConfig, overrides: list[str] | None = None) -> DictConfig:
    """``ckpt_path=`` without ``run_dir=``: the loss the checkpoint was trained with (its hyper-parameters), not the
    evaluation config's default, is the evaluation's, so its config and the report name the model that was trained
    (an MSL adapter evaluated this way was labelled LML before). A command-line ``loss=<other>`` is an error, as with
    ``run_dir=``; single keys (``loss.tau=...``) still apply on top. A hybrid checkpoint's encoder SHA-256 goes into
    ``cfg.method`` before the evaluation key is written, so the key records the encoder by content."""
    saved = read_checkpoint(cfg.ckpt_path).get("hyper_parameters") or {}
    overrides = command_line_overrides() if overrides is None else overrides
    with open_dict(cfg):
        if saved.get("loss"):
            check_targets(saved["loss"], source=f"checkpoint {cfg.ckpt_path}", prefix="loss.")
            mine = _values_on_top(overrides, ("loss",), saved, lambda key, ov: ValueError(
                f"ckpt_path={cfg.ckpt_path} was trained with loss={run_choice(saved, 'loss')}, but the command line "
                f"has {ov!r}: its results would be labelled as another loss; drop {ov!r}"))
            cfg.loss = _typed_like("loss", OmegaConf.create(saved["loss"]))
            _apply_values(cfg, mine)
        method = saved.get("method") or {}
        if method.get("encoder_sha256") and (cfg.get("method") or {}).get("name") == method.get("name"):
            cfg.method.encoder_sha256 = method["encoder_sha256"]
    return cfg


def _typed_like(key: str, value: Any) -> Any:
    """The saved run's ``value`` of ``key`` as the schema types it (a typed config refuses a plain node
    where it declares a dataclass); ``loss`` is typed by each loss's own schema, so it stays as saved."""
    node_type = typing.get_type_hints(RunConfig).get(key)
    if dataclasses.is_dataclass(node_type):
        return OmegaConf.merge(OmegaConf.structured(node_type), value)
    return value


# ---------------------------------------------------------------------------- data, rows and batches
def eval_data(cfg: DictConfig):
    """``(catalog, datamodule)`` set up for ``cfg.split`` (``subset=N``: its first N rows; popularity
    also reads the training targets). Bad split, subset, top_k or decoder settings fail before loading.
    ``split=train`` ranks the training file's rows (a DLLM2Rec teacher's lists; row r = the file's row r)."""
    split = cfg.split
    if split not in ("valid", "test", "train"):
        raise ValueError(f"split: {split!r} (valid, test; train: the training rows, for a DLLM2Rec teacher)")
    if split == "train" and cfg.data.get("sample") is not None:
        raise ValueError(f"split=train with data.sample={cfg.data.sample}: random rows would not keep the training "
                         "file's row numbers; use subset=N (its first N rows)")
    if cfg.get("subset") is not None:  # `subset=N` wins over a preset's data.<split>_subset
        if isinstance(cfg.subset, bool) or not isinstance(cfg.subset, int) or cfg.subset < 1:
            raise ValueError(f"subset={cfg.subset!r}: expected a whole number >= 1 (the first N {split} rows)")
        with open_dict(cfg):
            cfg.data[f"{split}_subset"] = cfg.subset
    decoder_settings(cfg.decoder, cfg.top_k)
    _, catalog, dm = build_data(cfg)
    dm.setup({"valid": "validate", "test": "test", "train": "fit"}[split])
    if needs_train_targets(cfg.decoder):  # popularity counts the training targets, whatever the split
        if not cfg.dataset.get("train_file"):
            raise ValueError(f"decoder={cfg.decoder.name} needs dataset.train_file (it ranks by training targets)")
        dm.setup("fit")
    return catalog, dm


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


def length_sorted_batches(rows: list[int], prompt_len: Mapping[int, int] | Sequence[int],
                          batch_size: int) -> list[list[int]]:
    """``rows`` grouped into batches of similar prompt length (less left padding); ties by row."""
    order = sorted(rows, key=lambda r: (prompt_len[r], r))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def count_undecodable_targets(decoder, catalog, targets: list[int]) -> int:
    """Users whose target title is longer than the decoder's ``max_new_tokens`` and so can never be
    ranked; all of them is an error (every metric would be 0 for a reason that is not the model)."""
    limit = getattr(decoder, "max_new_tokens", None)
    if limit is None or not getattr(decoder, "constrained", True):  # grounding ranks every title whatever it writes
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


# ---------------------------------------------------------------------------- Trainer and output
def global_rank() -> int:
    """This process's rank, known before the Trainer exists (Lightning's launchers set the env)."""
    return int(getattr(rank_zero_only, "rank", 0))


def eval_trainer(cfg: DictConfig, callbacks: list) -> L.Trainer:
    """A Trainer for ``predict`` from ``cfg.trainer`` (``trainer=ddp_sim``, ``trainer.devices=N``):
    no logger, no checkpoints; the model's own dtype unless ``trainer.precision`` names one."""
    tcfg = plain(cfg.trainer)
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


def format_table(metrics: Mapping[str, Any]) -> str:
    """The float metrics on one line, ``hr@1 0.1000  hr@5 ...``, ordered by name then cut-off."""
    metrics = {k: v for k, v in metrics.items() if isinstance(v, float)}
    keys = sorted(metrics, key=lambda k: (k.split("@")[0], int(k.split("@")[1]) if "@" in k else 0))
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys)


def report(out_dir: Path, line: str) -> None:
    """Print the one-line result table and keep it in ``out_dir/summary.txt``."""
    print(line)
    (out_dir / "summary.txt").write_text(line + "\n")


def save_valid_weights(module, batches: Iterable[dict], out_dir: Path) -> None:
    """Fig. 5: the paper's w at the positive token, per response position of ``batches``, at tau 1
    (``module.valid_weights``): w_lml = 1 - P(y) (full softmax), w_msl = 1 - P_valid(y) (softmax over
    the valid set), into ``out_dir/w_values.npz``. Batches go to the module's device."""
    device = next(module.model.parameters()).device
    with torch.no_grad():
        parts = [module.valid_weights({k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()})
                 for b in batches]
    w = {k: torch.cat([p[k] for p in parts]).cpu().numpy() for k in ("w_lml", "w_msl", "num_valid")}
    np.savez(out_dir / "w_values.npz", **w, tau=np.float64(1.0))
    multi = w["num_valid"] > 1
    log.info("w at tau 1 over %d response positions with > 1 valid token: LML (1 - P) mean %.4f, "
             "MSL (1 - P_valid) mean %.4f", int(multi.sum()), float(w["w_lml"][multi].mean()),
             float(w["w_msl"][multi].mean()))
