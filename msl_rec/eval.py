"""Evaluation app: rank a split with a decoder and write predictions.jsonl + metrics.json.

    msl-rec-eval ckpt_path=outputs/train/runs/<t>/checkpoints/last.ckpt   # a checkpoint: its loss, this config
    msl-rec-eval run_dir=outputs/train/runs/<t>      # that run's config and best (else last) checkpoint
    msl-rec-eval                                     # the zero-shot backbone
    msl-rec-eval run_dir=outputs/train/runs/<sasrec run> split=test   # a sequential method's run alike
    msl-rec-eval decoder=popularity subset=100       # no model is loaded for popularity/random
    msl-rec-eval split=test dataset.test_file=...    # the held-back split
    msl-rec-eval shard=0/2 hydra.run.dir=outputs/ev/0   # half of the split (run 1/2 elsewhere), then
    msl-rec-eval merge=[outputs/ev/0,outputs/ev/1]   # metrics over both halves' predictions

Outputs go to the run folder (``hydra.run.dir=`` moves it); a one-line table is printed.
Predictions are appended to ``predictions.jsonl`` batch by batch: the same command with the same
``hydra.run.dir=`` resumes after the last written batch (``resume=false`` starts over). The pipeline
(rows, store, key, metrics) is :mod:`msl_rec.evaluation`, the one validation during training uses.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from msl_rec.decoding import build_decoder, validate_top_k
from msl_rec.evaluation import runner
from msl_rec.evaluation.engine import BatchList, EvalPredictor, PredictionWriter, progress_callbacks
from msl_rec.evaluation.evaluate import EvalResult
from msl_rec.evaluation.key import eval_key, eval_record
from msl_rec.evaluation.predict import BatchPredictor
from msl_rec.evaluation.store import fold_predictions, merge_shards, resume_predictions
from msl_rec.training.methods import check_method, load_module
from msl_rec.utils.config import CONFIG_DIR, plain
from msl_rec.utils.dashboard import log_evaluation
from msl_rec.utils.files import write_atomic
from msl_rec.utils.registry import check_targets
from msl_rec.utils.signals import StopPredictionOnSigterm
from msl_rec.utils.task import task_wrapper

log = logging.getLogger(__name__)


def merge_app(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``merge=[dir, ...]``: one predictions.jsonl and metrics.json over the shards of one evaluation."""
    out_dir = Path(cfg.paths.output_dir)
    result, record = merge_shards(list(cfg.merge), validate_top_k(cfg.top_k), out_dir)
    metrics = {f"{cfg.split}/{k}": float(v) for k, v in result.metrics.items()}
    result.metrics.update(record)
    runner.report(out_dir, f"merged {len(cfg.merge)} {cfg.split} n={len(result.predictions)}  "
                  + runner.format_table(result.metrics))
    return metrics, {"result": result}


@task_wrapper
def evaluate_app(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    if cfg.get("merge"):
        return merge_app(cfg)
    if cfg.get("run_dir"):
        cfg = runner.apply_run_dir(cfg)  # a folder that is not a run: an error naming the missing config
    elif cfg.get("ckpt_path"):
        cfg = runner.apply_checkpoint(cfg)  # its trained loss (and encoder), not this config's defaults
        saved = Path(cfg.paths.output_dir) / ".hydra" / "config.yaml"
        if saved.is_file():  # the run folder's config is the one evaluated (the report labels runs by it)
            write_atomic(saved, OmegaConf.to_yaml(cfg))
    check_targets(cfg, source="the evaluation config")
    check_method(cfg, with_loss=False)  # e.g. decoder=item_scores on an LLM run: an error naming both
    L.seed_everything(int(cfg.seed), workers=True)
    split = cfg.split
    catalog, dm = runner.eval_data(cfg)
    samples = dm.eval_samples(split)
    rows = runner.shard_range(len(samples), cfg.get("shard"))
    if len(rows) == 0:
        raise ValueError(f"shard={cfg.get('shard')} selects no rows of the {len(samples)} {split} rows (n=0): "
                         "use fewer shards")
    expected = {r: (samples[r].user_id, samples[r].target) for r in rows}
    decoder = build_decoder(plain(cfg.decoder), catalog, train_targets=dm.train_targets or None, top_k=cfg.top_k)
    predictor = BatchPredictor(decoder, catalog, plain(cfg.get("scoring")), dm.prompt_preamble)
    n_undecodable = runner.count_undecodable_targets(decoder, catalog, [t for _, t in expected.values()])
    out_dir = Path(cfg.paths.output_dir)
    key = eval_key(cfg, rows, predictor)
    rank0 = runner.global_rank() == 0
    done = resume_predictions(out_dir, key, bool(cfg.get("resume", True)), expected, write=rank0)
    if done:
        log.info("resuming: %d of %d users already in %s", len(done), len(rows), out_dir / "predictions.jsonl")
    module = load_module(cfg, catalog) if predictor.needs_model else None
    model = module.model.eval() if module is not None else None

    # the rows not yet written, in batches of similar prompt length (keyed by row, so the order
    # changes nothing in the results); on N processes each rank takes every N-th batch
    done_rows = {p["row"] for p in done}
    todo = runner.length_sorted_batches([r for r in rows if r not in done_rows], dm.eval_lengths(split),
                                        dm.eval_batch_size)
    # after the writer: a SIGTERM stops once the current batch is written (exit 143; rerun to continue);
    # the progress bar counts users (users/s, ETA), not batches
    trainer = runner.eval_trainer(cfg, [PredictionWriter(out_dir, todo), StopPredictionOnSigterm(),
                                 *progress_callbacks(cfg.trainer, todo)])
    if todo:
        trainer.predict(EvalPredictor(predictor, model), dataloaders=BatchList(dm, split, todo).loader(),
                        return_predictions=False)
        trainer.strategy.barrier("predictions written")
    if not trainer.is_global_zero:
        return {}, {}
    predictions = fold_predictions(out_dir, expected)
    if len(predictions) != len(rows):
        missing = sorted(set(rows) - {p["row"] for p in predictions})
        raise RuntimeError(f"{out_dir / 'predictions.jsonl'}: {len(missing)} of {len(rows)} rows have no prediction "
                           f"(first: {missing[:5]}); rerun the same command to resume")
    result = EvalResult.of(predictions, tuple(cfg.top_k))
    record = {**eval_record(key, len(predictions), num_negatives=predictor.num_negatives),
              "n_undecodable_targets": n_undecodable}
    write_atomic(out_dir / "metrics.json", json.dumps({**result.metrics, **record}, indent=2) + "\n")
    if cfg.get("save_w") and module is not None:
        runner.save_valid_weights(module, dm.eval_dataloader(split, rows), out_dir)
    metrics = {f"{split}/{k}": float(v) for k, v in result.metrics.items()}
    result.metrics.update(record)
    # logger=wandb: an eval run in the evaluated training run's group, named <its name>/eval-<split>
    log_evaluation(cfg, out_dir, metrics, record)
    runner.report(out_dir, f"{cfg.decoder.name} {split} n={len(result.predictions)}  "
                  + runner.format_table(result.metrics))
    return metrics, {"result": result}


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval.yaml")
def hydra_main(cfg: DictConfig) -> None:
    evaluate_app(cfg)


def main() -> None:
    hydra_main()


if __name__ == "__main__":
    main()
