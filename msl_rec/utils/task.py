"""The task wrapper around a training/eval run: close loggers however the run ends.

In a multirun (sweep) a failing job is logged and reported as NaN for the optimised metric, so the
remaining jobs still run (Optuna records a NaN value as a failed trial); in a single run the
exception propagates.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger(__name__)


def is_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except (ImportError, ValueError):  # no hydra, or no HydraConfig set (a plain call)
        return False


def close_loggers() -> None:
    """Finish a wandb run if one is open (rank 0 only opens one)."""
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    except ImportError:  # pragma: no cover
        pass


def task_wrapper(task: Callable[[DictConfig], tuple[dict, dict]]):
    """Wrap ``task(cfg) -> (metrics, objects)``: loggers closed in ``finally``; sweeps survive a
    failed job (metrics then ``{}``; :func:`metric_value` gives NaN)."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> tuple[dict, dict]:
        try:
            return task(cfg)
        except Exception:
            if not is_multirun():
                raise
            log.exception("job failed; the sweep goes on (its metric is NaN)")
            return {}, {}
        finally:
            close_loggers()

    return wrapped


def metric_value(metrics: dict[str, Any], name: str | None) -> float | None:
    """The value a sweep optimises, as a float; NaN when the run did not produce it."""
    if not name:
        return None
    if name not in metrics:
        log.warning("optimized_metric %r not among the run's metrics (%s)", name, sorted(metrics))
        return math.nan
    value = metrics[name]
    return float(value.item() if hasattr(value, "item") else value)
