"""Evaluation: one pipeline for validation during training and for ``msl-rec-eval``.

- :mod:`~msl_rec.evaluation.predict`: a batch's prediction rows (``BatchPredictor``)
- :mod:`~msl_rec.evaluation.evaluate`: the one metrics function (``summarize``) over those rows
- :mod:`~msl_rec.evaluation.store`: ``predictions.jsonl`` written batch by batch, resumed, merged
- :mod:`~msl_rec.evaluation.key`: the eval key (what decides the predictions) and metrics.json's record
- :mod:`~msl_rec.evaluation.engine`: ``Trainer.predict`` over length-sorted batches on 1 or N processes
- :mod:`~msl_rec.evaluation.runner`: run_dir=, shard=, the eval Trainer, ``evaluate`` in one process
"""

from msl_rec.evaluation.evaluate import EvalResult, summarize
from msl_rec.evaluation.predict import BatchPredictor
from msl_rec.evaluation.runner import evaluate
from msl_rec.evaluation.store import load_predictions

__all__ = ["BatchPredictor", "EvalResult", "evaluate", "load_predictions", "summarize"]
