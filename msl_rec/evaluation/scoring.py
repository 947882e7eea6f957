"""A sensitive quality signal: the target's log-probability, and its rank among sampled titles.

NDCG/HR over a few hundred users move in steps of 1/n and stay at 0 for a weak model; the target's
log-likelihood moves with every bit of training. Per user, by teacher forcing on prompt + response:

* ``target_logp``: ``sum_t log p(y_t | prompt, y_<t)`` over the target's whole response (EOS
  included), natural log, under the decoder's own masking: ``mask="after"`` (``cbs``) a
  full-vocabulary log-softmax, ``mask="before"`` (``cbs_masked``) a log-softmax over the trie-valid
  tokens of each position only (the batch's ``valid_ids``). Higher is better.
* ``sampled_rank``: the 0-based rank of the target among the target and ``num_negatives`` catalog
  titles drawn uniformly (distinct titles, never the target's; seeded by ``(seed, user, target)``),
  all scored as above; ties count against the target. ``mrr_sampled`` is the mean of
  ``1 / (sampled_rank + 1)``.

Known bias: a sampled rank is not a full-catalog rank. Among 99 random titles most are easy, so
sampled ranks are optimistic and can order two models differently than full ranking does (Krichene
& Rendle, "On Sampled Metrics for Item Recommendation", KDD 2020). Use the signal for what it is good
for: telling whether training moved the model, with a tight interval, not for comparing with
published NDCG.

Cost (:class:`~msl_rec.evaluation.predict.BatchPredictor`): no prompt forward of its own. The
target's response continues the prompt KV the beam search already computed (one prompt forward per
user in all), one user at a time so the value does not depend on the batch; the sampled candidates of
several users run in one forward (``chunk_size`` at a time) from the same KV.

Precision: always float32, whatever the decoder's ``dtype`` (a ``bfloat16`` decoder's prompts are
encoded once more in float32 for it), the model's own dtype (a bf16 backbone is scored through a
float32, adapter-merged copy) or an enclosing autocast (Lightning's ``bf16-mixed`` validation), so
the signal is the same on every machine.

This module holds the settings (``scoring:`` in the configs) and the sampling of negatives; the
log-probabilities come from :mod:`msl_rec.models.inference` and :mod:`msl_rec.losses.functional`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np


@dataclass(frozen=True)
class ScoringSettings:
    """The ``scoring:`` config node.

    Attributes:
        target_logp: compute ``target_logp`` (and allow the sampled rank) for decoders with a model.
        num_negatives: titles the target is ranked against; 0 (the default): no ``sampled_rank``.
        seed: seeds the sampled titles (with each user's id and target id).
        chunk_size: candidate responses per forward (memory: as many copies of a prompt's KV).
    """

    target_logp: bool = True
    num_negatives: int = 0
    seed: int = 0
    chunk_size: int = 32

    @classmethod
    def from_config(cls, scoring: Mapping | None) -> ScoringSettings:
        """Checked settings from a ``scoring`` mapping (None: the defaults); unknown keys or bad values
        are an error naming ``scoring.<key>``."""
        scoring = dict(scoring or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(scoring) - known)
        if unknown:
            raise ValueError(f"scoring: unknown key(s) {unknown}; known: {sorted(known)}")
        out = cls(**scoring)
        if out.target_logp not in (True, False):
            raise ValueError(f"scoring.target_logp={out.target_logp!r}: must be true or false")
        numbers = {}
        for key, low in (("num_negatives", 0), ("chunk_size", 1), ("seed", None)):
            value = getattr(out, key)
            ok = not isinstance(value, bool) and isinstance(value, (int, float)) and int(value) == value
            if not ok or (low is not None and value < low):
                raise ValueError(f"scoring.{key}={value!r}: must be a whole number"
                                 + (f" >= {low}" if low is not None else ""))
            numbers[key] = int(value)
        return cls(target_logp=bool(out.target_logp), **numbers)


def sample_negatives(catalog, num_negatives: int, seed: int, user_id: int, target_id: int) -> list[int]:
    """Sequence indices of ``num_negatives`` distinct catalog titles other than the target's (fewer if
    the catalog is smaller), drawn uniformly with a generator seeded by ``(seed, user_id, target_id)``,
    so a user's negatives do not depend on the batch or the order of evaluation."""
    n_seqs = len(catalog.sequences)
    target_seq = catalog.item_seq[int(target_id)]
    n = min(int(num_negatives), n_seqs - 1)
    rng = np.random.default_rng([int(seed), int(user_id), int(target_id)])
    draw = rng.choice(n_seqs - 1, size=n, replace=False)
    return [int(s) + (s >= target_seq) for s in draw]  # skip the target's sequence
