"""What a wandb run shows beyond Lightning's curves (README "Dashboards"); no-ops without a wandb logger.

- :class:`WandbDashboard` (``callbacks.dashboard``): the step axis ``trainer/global_step`` for
  ``train/*``, ``val/*`` and ``val_samples/*``; after every validation, the run summary's ``val/*``
  values are the selected epoch's (the ones :class:`~msl_rec.utils.callbacks.BestMetricsWriter`
  writes into metrics.json), not the last epoch's; and per validation a table of what the model
  recommends to a few fixed users and a histogram of the target's rank.
- :func:`log_evaluation`: ``msl-rec-eval``'s metrics as an eval run in the group of the training run
  it evaluates.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from msl_rec.utils.callbacks import BestMetricsWriter
from msl_rec.utils.logging_utils import (
    MAX_NAME_LEN,
    MAX_TAG_LEN,
    instantiate_loggers,
    log_config,
    read_run_file,
    run_identity,
)

log = logging.getLogger(__name__)

STEP_AXIS = "trainer/global_step"  # the x axis Lightning's WandbLogger logs every metric with
TABLE_KEY = "val_samples/recommendations"
RANK_KEY = "val_samples/target_rank"


def wandb_run(trainer: L.Trainer):
    """The wandb run of the trainer's WandbLogger on rank 0; None without one (or on other ranks)."""
    if not trainer.is_global_zero:
        return None
    return next((lg.experiment for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)


class WandbDashboard(L.Callback):
    """Selected-epoch summaries, sample recommendations and the target-rank histogram in wandb.

    Reads the prediction rows ``RecLitModule.validation_step`` returns (``outputs``: a list of dicts
    with ``user_id``, ``target_id``, ``rank`` (0-based, -1: not in the list) and ``ranked_ids`` (the
    list, each entry the item ids of one title) and ``scores``); with ``outputs`` None it logs no table.
    Each validation logs, at ``trainer/global_step``:

    - ``val_samples/recommendations``: a table, one row per fixed user (the first ``sample_users``
      validation rows this process decodes): the last ``history_titles`` titles of the history, the
      target, the top ``top_titles`` titles with their scores, the target's rank and whether it is
      among those titles;
    - ``val_samples/target_rank``: a histogram of the ranks of the targets that were ranked (one bin
      per rank), and ``val_samples/not_ranked`` / ``val_samples/users``: how many were not / all users.

    Under DDP these use rank 0's users only. Must come after ``best_metrics`` in the callbacks (it reads
    what that writer selected; it rewrites the summary at the end of training in any case).
    """

    def __init__(self, sample_users: int = 5, history_titles: int = 3, top_titles: int = 5):
        for key, value in (("sample_users", sample_users), ("history_titles", history_titles),
                           ("top_titles", top_titles)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"callbacks.dashboard.{key}={value!r}: expected a whole number >= 1")
        self.sample_users, self.history_titles, self.top_titles = sample_users, history_titles, top_titles
        self._run = None
        self._order: list[int] = []  # validation rows in the order this process decodes them
        self._seen = 0
        self._samples: list[tuple[int, dict]] = []
        self._ranks: list[int] = []
        self._list_len = 0

    # ------------------------------------------------------------------ axes and summary
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run = wandb_run(trainer)
        if self._run is None:
            return
        self._run.define_metric(STEP_AXIS)
        for pattern in ("train/*", "val/*", "val_samples/*"):
            self._run.define_metric(pattern, step_metric=STEP_AXIS)

    def _write_selected_summary(self, trainer: L.Trainer) -> None:
        """``val/*`` of the selected epoch into the run summary (after Lightning logged this validation's
        values, which set the summary to the latest ones), with ``selected/epoch`` and ``selected/step``."""
        writer = next((cb for cb in trainer.callbacks if isinstance(cb, BestMetricsWriter)), None)
        if self._run is None or writer is None or not writer.best_metrics:
            return
        best = writer.best_metrics
        self._run.summary.update({**{k: v for k, v in best.items() if k.startswith("val/")},
                                  "selected/epoch": best.get("epoch"), "selected/step": best.get("step")})

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write_selected_summary(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write_selected_summary(trainer)

    # ------------------------------------------------------------------ recommendations
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen, self._samples, self._ranks, self._list_len = 0, [], [], 0
        if self._run is None or trainer.sanity_checking:
            return
        loader = trainer.val_dataloaders
        loader = loader[0] if isinstance(loader, (list, tuple)) else loader
        # a DistributedSampler under DDP, a SequentialSampler otherwise: the rows, in decoding order
        self._order = [int(i) for i in loader.sampler] if getattr(loader, "sampler", None) is not None else []

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._run is None or trainer.sanity_checking:
            return
        n = len(batch["user_ids"])
        rows = self._order[self._seen: self._seen + n]
        self._seen += n
        if not isinstance(outputs, list):  # a module that returns no prediction rows: nothing to show
            return
        fixed = set(self._order[: self.sample_users])
        for row, pred in zip(rows, outputs):  # outputs drop DDP's padding rows, which come last
            self._ranks.append(int(pred["rank"]))
            self._list_len = max(self._list_len, len(pred["ranked_ids"]))
            if row in fixed:
                self._samples.append((row, pred))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._run is None or trainer.sanity_checking or not self._ranks:
            return
        import wandb

        ranks = np.asarray(self._ranks)
        ranked = ranks[ranks >= 0]
        record: dict[str, Any] = {TABLE_KEY: self._table(trainer), "val_samples/users": len(ranks),
                                  "val_samples/not_ranked": int((ranks < 0).sum()), STEP_AXIS: trainer.global_step}
        if ranked.size:
            record[RANK_KEY] = wandb.Histogram(np_histogram=np.histogram(ranked, bins=np.arange(self._list_len + 1)))
        self._run.log(record)

    def _table(self, trainer: L.Trainer):
        """The fixed users' rows as a ``wandb.Table``."""
        import wandb

        dm = trainer.datamodule
        titles, samples = dm.catalog.titles, dm.eval_samples("valid")  # an LLM's or a sequential model's rows

        def title(item: int) -> str:
            return titles.get(int(item), f"<item {item}>")

        table = wandb.Table(columns=["epoch", "row", "user_id", f"history (last {self.history_titles})", "target",
                                     f"top {self.top_titles} (score)", "target rank", f"hit@{self.top_titles}"])
        for row, pred in sorted(self._samples, key=lambda s: s[0]):
            sample = samples[row]
            if (sample.user_id, sample.target) != (int(pred["user_id"]), int(pred["target_id"])):
                raise RuntimeError(f"validation row {row} is user {sample.user_id} / target {sample.target} but its "
                                   f"prediction is for user {pred['user_id']} / target {pred['target_id']}: the "
                                   "dashboard lost track of the validation order")
            top = [f"{i + 1}. {title(ids[0])} ({score:.3f})" for i, (ids, score)
                   in enumerate(zip(pred["ranked_ids"][: self.top_titles], pred["scores"]))]
            rank = int(pred["rank"])
            table.add_data(trainer.current_epoch, row, sample.user_id,
                           " | ".join(title(i) for i in sample.history[-self.history_titles:]),
                           title(sample.target), "\n".join(top), rank, 0 <= rank < self.top_titles)
        return table


def eval_identity(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(wandb name/group/tags/job type of an evaluation, the evaluated training run's :data:`RUN_FILE`
    record or None). With a training run (``run_dir=``, or a ``ckpt_path`` inside a run's
    ``checkpoints/``): ``<its name>/eval-<split>`` in its group; else ``<dataset>/<backbone>/<decoder>``."""
    train_dir = Path(cfg.run_dir) if cfg.get("run_dir") else None
    if train_dir is None and cfg.get("ckpt_path"):
        train_dir = Path(cfg.ckpt_path).parent.parent
    train_run = read_run_file(train_dir) if train_dir is not None else None
    extra = [cfg.split, OmegaConf.select(cfg, "decoder.name"), *(cfg.get("tags") or [])]
    suffix = f"/eval-{cfg.split}"
    if train_run:
        return {"name": train_run["name"][: MAX_NAME_LEN - len(suffix)] + suffix, "group": train_run.get("group"),
                "tags": [t[:MAX_TAG_LEN] for t in dict.fromkeys([*(train_run.get("tags") or []), *map(str, extra)])],
                "job_type": "eval"}, train_run
    base = "/".join(str(OmegaConf.select(cfg, k)) for k in ("dataset.name", "backbone.name", "decoder.name"))
    identity = run_identity(cfg, job_type="eval")
    return {**identity, "name": base + suffix, "group": base,
            "tags": [t[:MAX_TAG_LEN] for t in dict.fromkeys([*identity["tags"][:2], *map(str, extra)])]}, None


def log_evaluation(cfg: DictConfig, out_dir: Path, metrics: dict[str, float], record: dict[str, Any]) -> None:
    """``msl-rec-eval``'s config, metrics (``<split>/ndcg@10`` ...) and ``record`` (split, users, decoder,
    ...) to ``cfg.logger``'s loggers (none: nothing); a wandb run is linked to the training run it
    evaluates (:func:`eval_identity`; its id, name and group under ``train_run`` in the config)."""
    if not cfg.get("logger"):
        return
    identity, train_run = eval_identity(cfg)
    loggers = instantiate_loggers(cfg.get("logger"), out_dir, identity)
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)
    config.update(eval=record, train_run=train_run)
    log_config(loggers, config)
    for lg in loggers:
        lg.log_metrics(metrics)
        if isinstance(lg, WandbLogger):
            lg.experiment.summary.update({"split": record.get("split"), "n_users": record.get("n_users")})
        lg.finalize("success")
