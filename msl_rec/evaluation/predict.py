"""Predict one batch: rank its users with a decoder and score their targets, one prompt forward per user.

For a decoder with a model (beam search) a batch goes: each user's prompt encoded once, unpadded,
after the data's fixed preamble (:meth:`~msl_rec.models.inference.LMRunner.encode_prompts`) -> the search
over those prompt KVs -> the target's response continued from the same KV (``target_logp``) -> with
``scoring.num_negatives > 0`` the sampled titles of all users, batched, from the same KV
(``sampled_rank``; :mod:`msl_rec.evaluation.scoring`). A user's numbers depend only on its own prompt,
never on the batch size or the shard layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from msl_rec.evaluation.scoring import ScoringSettings, sample_negatives
from msl_rec.metrics import rank_of_target
from msl_rec.models.inference import CausalLMInference, EncodedPrompts, LMRunner


class BatchPredictor:
    """Prediction rows for batches of users (keep one per evaluation: it holds the model copy and the
    shared preamble's KV across batches).

    Args:
        decoder: a :class:`~msl_rec.decoding.base.Decoder`; a model decoder's ``dtype``,
            ``shared_prompt`` and ``share_preamble`` configure the inference runner.
        catalog: the item catalog.
        scoring: the ``scoring:`` node (:class:`~msl_rec.evaluation.scoring.ScoringSettings`).
        preamble_ids: the token ids every prompt starts with (``RecDataModule.prompt_preamble``), whose
            KV is computed once; None: each prompt is run whole.

    Attributes:
        needs_model: whether :meth:`predict` needs a model (False for popularity / random).
        num_negatives: sampled titles per user, 0 when the sampled rank is off.
        compute_dtype: the decoder's weights dtype (e.g. ``"float32"``), None without a causal LM.
    """

    def __init__(self, decoder, catalog, scoring: Mapping | None = None, preamble_ids: Sequence[int] | None = None):
        settings = ScoringSettings.from_config(scoring)
        self.decoder, self.catalog, self.settings = decoder, catalog, settings
        self.needs_model = bool(getattr(decoder, "needs_model", False))
        # a model decoder drives a causal LM (beam search, grounding) unless it says otherwise: a sequential
        # model's ranker (decoding/scores.py) calls its model itself
        self.uses_lm = self.needs_model and bool(getattr(decoder, "uses_lm", True))
        self.mask = getattr(decoder, "mask", None) if self.uses_lm else None
        self.target_logp = bool(settings.target_logp and self.mask is not None)
        self.num_negatives = settings.num_negatives if self.target_logp else 0
        self.inference = self.scoring_inference = None
        self.compute_dtype = None
        if self.uses_lm:
            self.inference = CausalLMInference(dtype=getattr(decoder, "dtype", "float32"),
                                               shared_prompt=getattr(decoder, "shared_prompt", None),
                                               share_preamble=getattr(decoder, "share_preamble", True),
                                               preamble_ids=preamble_ids)
            self.compute_dtype = self.inference.compute_dtype
            # the signal is float32 whatever the decoding dtype: a bf16 decoder's prompts are re-encoded for it
            self.scoring_inference = (self.inference if self.inference.compute_dtype == "float32" else
                                      CausalLMInference("float32", self.inference.shared_prompt,
                                                        self.inference.share_preamble, preamble_ids))
        elif self.needs_model:  # a sequential model's ranker: the dtype it scores in
            self.compute_dtype = getattr(decoder, "compute_dtype", None)

    def predict(self, model, batch: Mapping[str, torch.Tensor]) -> list[dict]:
        """One row per user of ``batch``: ``user_id, target_id, rank`` (0-based, -1 if not ranked),
        ``ranked_ids`` (item ids of each ranked sequence), ``scores``, plus ``target_logp`` and
        ``sampled_rank, sampled_negatives`` when on. No grad is recorded."""
        extra = [{} for _ in range(len(batch["target_ids"]))]
        if not self.uses_lm:
            rankings = self.decoder.rank(model, batch)
        else:
            if model is None:
                raise ValueError(f"{type(self.decoder).__name__} needs a model, got None")
            lm = self.inference.bind(model)
            prompts = lm.encode_prompts(batch["prompt_input_ids"], batch["prompt_attention_mask"])
            rankings = self.decoder.search(lm, prompts)
            if self.target_logp:
                if self.scoring_inference is not self.inference:
                    lm = self.scoring_inference.bind(model)
                    prompts = lm.encode_prompts(batch["prompt_input_ids"], batch["prompt_attention_mask"])
                extra = self.score_targets(lm, prompts, batch["user_ids"].tolist(), batch["target_ids"].tolist())
        rows = []
        for user, target, ranking, more in zip(batch["user_ids"].tolist(), batch["target_ids"].tolist(), rankings,
                                               extra):
            ranked_ids = [list(self.catalog.seq_items[s]) for s, _ in ranking]
            rows.append({"user_id": int(user), "target_id": int(target), "rank": rank_of_target(target, ranked_ids),
                         "ranked_ids": ranked_ids, "scores": [float(sc) for _, sc in ranking], **more})
        return rows

    # ------------------------------------------------------------------ the sensitive signal
    def score_targets(self, lm: LMRunner, prompts: EncodedPrompts, user_ids: list[int],
                      target_ids: list[int]) -> list[dict]:
        """Per user ``{"target_logp"}`` (plus ``sampled_rank``, ``sampled_negatives`` when
        ``num_negatives > 0``) from the encoded prompts, under the decoder's masking."""
        target_seqs = [self.catalog.item_seq[int(t)] for t in target_ids]
        # one user per forward: exactly the user's own tokens, so target_logp does not depend on the batch
        logp = self.sequence_logps(lm, prompts, list(range(len(target_ids))), target_seqs, chunk_size=1)
        rows = [{"target_logp": float(x)} for x in logp.tolist()]
        if self.num_negatives == 0:
            return rows
        negatives = [sample_negatives(self.catalog, self.num_negatives, self.settings.seed, u, t)
                     for u, t in zip(user_ids, target_ids)]
        users = [b for b, negs in enumerate(negatives) for _ in negs]
        neg_logp = self.sequence_logps(lm, prompts, users, [s for negs in negatives for s in negs],
                                       chunk_size=self.settings.chunk_size)
        start = 0
        for b, negs in enumerate(negatives):
            # ties count against the target
            rows[b]["sampled_rank"] = int((neg_logp[start: start + len(negs)] >= logp[b]).sum())
            rows[b]["sampled_negatives"] = len(negs)
            start += len(negs)
        return rows

    def sequence_logps(self, lm: LMRunner, prompts: EncodedPrompts, users: list[int], seqs: list[int],
                       chunk_size: int) -> torch.Tensor:
        """(n,) float32 log-probability of catalog sequence ``seqs[i]`` after user ``users[i]``'s prompt,
        under the decoder's masking (``before``: renormalised over the trie-valid ids of each position)."""
        responses = [self.catalog.sequences[s] for s in seqs]
        valid = None
        if self.mask == "before":
            valid = [self.catalog.valid_id_tensor([self.catalog.seq_items[s][0]])[0, : len(r)]
                     for s, r in zip(seqs, responses)]
        return lm.response_logps(prompts, users, responses, valid, chunk_size=chunk_size).cpu()
