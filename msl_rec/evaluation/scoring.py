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

Cost: one forward of prompt + response per user, plus, for the sampled rank, the prompt's KV once
per user and one forward of the candidates' response tokens (``chunk_size`` candidates at a time).
Full-vocabulary logits are formed at response positions only.

Precision: always float32, whatever the decoder's ``dtype``, the model's own dtype (a bf16 backbone
is scored through a float32, adapter-merged copy) or an enclosing autocast (Lightning's
``bf16-mixed`` validation), so the signal is the same on every machine.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import torch

from msl_rec.losses.functional import union_logits
from msl_rec.models.backbone import backbone_body, output_weight
from msl_rec.utils.precision import ModelCopies, autocast_off

MASK_MODES = ("before", "after")


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, valid_ids: torch.Tensor | None,
                mask: str) -> torch.Tensor:
    """(N,) float32 ``log p(label)`` at N response positions.

    Args:
        hidden: (N, d) final hidden states of the positions that predict ``labels``.
        weight: (V, d) output embedding.
        labels: (N,) token ids.
        valid_ids: (N, K) trie-valid ids per position, -1 padded (needed for ``mask="before"``).
        mask: ``"after"``: log-softmax over the vocabulary; ``"before"``: over the valid ids only.
    """
    if mask == "after":
        logits = hidden.float() @ weight.float().t()  # (N, V), response positions only
        return logits.gather(1, labels[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    if valid_ids is None:
        raise ValueError("mask='before' scoring needs the batch's valid_ids")
    ok = valid_ids >= 0
    if not bool((ok & (valid_ids == labels[:, None])).any(-1).all()):
        raise ValueError("a response token is not among its position's valid_ids: catalog and batch disagree")
    # only the batch's distinct valid ids are scored (as MSL does), not the whole vocabulary
    logits, label_cols, valid_cols = union_logits(hidden.float(), weight.float(), labels, valid_ids)
    valid_logits = logits.gather(1, valid_cols.clamp_min(0)).masked_fill(~ok, float("-inf"))
    return logits.gather(1, label_cols[:, None]).squeeze(1) - torch.logsumexp(valid_logits, dim=-1)


def _sum_by_row(values: torch.Tensor, row: torch.Tensor, n_rows: int) -> torch.Tensor:
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add_(0, row, values)


class TargetScorer:
    """Per-user ``target_logp`` and ``sampled_rank`` (see the module docstring).

    Args:
        catalog: the :class:`~msl_rec.data.catalog.ItemCatalog` (response ids, valid ids).
        mask: the decoder's masking, ``"before"`` or ``"after"``.
        num_negatives: sampled titles the target is ranked against; 0: no ``sampled_rank``.
        seed: seeds the sampled titles (with each user's id and target id).
        chunk_size: candidate responses scored per forward (memory: ``chunk_size`` copies of a prompt's KV).
        copies: where a float32 copy of a non-float32 model is held (the decoder's, so a bf16 backbone
            is copied once for both); None: a private one.
    """

    def __init__(self, catalog, mask: str = "before", num_negatives: int = 99, seed: int = 0, chunk_size: int = 32,
                 copies: ModelCopies | None = None):
        if mask not in MASK_MODES:
            raise ValueError(f"scoring: mask must be one of {MASK_MODES}, got {mask!r}")
        if int(num_negatives) < 0 or int(chunk_size) < 1:
            raise ValueError(f"scoring: num_negatives >= 0 and chunk_size >= 1 (got {num_negatives}, {chunk_size})")
        self.catalog = catalog
        self.mask = mask
        self.num_negatives = int(num_negatives)
        self.seed = int(seed)
        self.chunk_size = int(chunk_size)
        self.copies = copies if copies is not None else ModelCopies()

    @classmethod
    def for_decoder(cls, decoder, catalog, scoring: Mapping | None = None) -> TargetScorer | None:
        """The scorer matching ``decoder``'s masking; None for decoders without a model or when
        ``scoring.target_logp`` is false."""
        scoring = dict(scoring or {})
        if not scoring.pop("target_logp", True) or not getattr(decoder, "needs_model", False):
            return None
        mask = getattr(decoder, "mask", None)
        return None if mask is None else cls(catalog, mask=mask, copies=getattr(decoder, "copies", None), **scoring)

    # ------------------------------------------------------------------ target
    @torch.no_grad()
    def target_logps(self, model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B,) float32 log-probability of each row's target response, by teacher forcing, with ``model``
        as given (:meth:`score` hands it a float32 model with autocast off)."""
        missing = [k for k in ("input_ids", "attention_mask", "labels") if k not in batch]
        if missing:
            raise ValueError(f"target_logp needs the batch's prompt+response fields; missing {missing} "
                             "(build batches with RecDataModule, or pass scoring={'target_logp': False})")
        ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        hidden = self._unpadded_hidden(model, ids, am)[:, :-1]
        target = labels[:, 1:]
        pick = target != -100
        row = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(pick)[pick]
        valid = None
        if self.mask == "before":
            v = batch["valid_ids"].to(ids.device)
            keep = torch.arange(v.shape[1], device=v.device)[None, :] < batch["response_len"].to(v.device)[:, None]
            valid = v[keep]
        logp = token_logps(hidden[pick], output_weight(model), target[pick], valid, self.mask)
        return _sum_by_row(logp, row, ids.shape[0])

    @staticmethod
    def _unpadded_hidden(model, ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
        """(B, T, d) final hidden states, each row run on its own real tokens (zeros at padding).

        One forward per user, never a padded batch: the backbone's matmul shapes, and so its float32
        rounding, depend only on the user's own sequence, not on the batch size, the other users'
        lengths or the shard layout (a padded batch moved ``target_logp`` by ~1e-6 relative). No
        padding is computed, so the cost is about that of the padded batch."""
        body = backbone_body(model)
        real = am.bool()
        rows = []
        for b in range(ids.shape[0]):
            x = ids[b][real[b]][None]
            rows.append(body(input_ids=x, position_ids=torch.arange(x.shape[1], device=x.device)[None],
                             use_cache=False).last_hidden_state[0])
        hidden = rows[0].new_zeros(ids.shape[0], ids.shape[1], rows[0].shape[-1])
        for b, h in enumerate(rows):
            hidden[b, real[b]] = h
        return hidden

    # ------------------------------------------------------------------ sampled rank
    def negatives(self, user_id: int, target_id: int) -> list[int]:
        """Sequence indices of ``num_negatives`` distinct titles other than the target's (seeded)."""
        n_seqs = len(self.catalog.sequences)
        target_seq = self.catalog.item_seq[int(target_id)]
        n = min(self.num_negatives, n_seqs - 1)
        rng = np.random.default_rng([self.seed, int(user_id), int(target_id)])
        draw = rng.choice(n_seqs - 1, size=n, replace=False)
        return [int(s) + (s >= target_seq) for s in draw]  # skip the target's sequence

    @torch.no_grad()
    def candidate_logps(self, model, prompt_ids: torch.Tensor, seqs: list[int]) -> torch.Tensor:
        """(len(seqs),) float32 log-probability of each catalog sequence after one unpadded prompt
        (``model`` as given, as in :meth:`target_logps`)."""
        body, weight = backbone_body(model), output_weight(model)
        device = prompt_ids.device
        tp = prompt_ids.shape[0]
        out = body(input_ids=prompt_ids[None], position_ids=torch.arange(tp, device=device)[None], use_cache=True)
        prompt_cache, h0 = out.past_key_values, out.last_hidden_state[0, -1]
        logps = []
        for lo in range(0, len(seqs), self.chunk_size):
            chunk = seqs[lo: lo + self.chunk_size]
            resp = [self.catalog.sequences[s] for s in chunk]
            c, width = len(resp), max(map(len, resp))
            toks = torch.zeros(c, width, dtype=torch.long, device=device)
            real = torch.zeros(c, width, dtype=torch.bool, device=device)
            for i, r in enumerate(resp):
                toks[i, : len(r)] = torch.as_tensor(r, device=device)
                real[i, : len(r)] = True
            hidden = h0.expand(c, 1, -1)
            if width > 1:  # positions 1.. are predicted from the response tokens before them
                cache = copy.deepcopy(prompt_cache)
                cache.batch_repeat_interleave(c)
                # right padding: a real token never attends to the pads after it (causal)
                step = body(input_ids=toks[:, :-1], past_key_values=cache, use_cache=True,
                            attention_mask=torch.ones(c, tp + width - 1, dtype=torch.long, device=device),
                            position_ids=(tp + torch.arange(width - 1, device=device)).expand(c, -1))
                hidden = torch.cat([hidden, step.last_hidden_state], dim=1)
            valid = None
            if self.mask == "before":
                # (c, width, K): one row of valid ids per response position
                valid = self.catalog.valid_id_tensor([self.catalog.seq_items[s][0] for s in chunk]).to(device)[real]
            row = torch.arange(c, device=device)[:, None].expand_as(real)[real]
            logp = token_logps(hidden[real], weight, toks[real], valid, self.mask)
            logps.append(_sum_by_row(logp, row, c))
        return torch.cat(logps) if logps else torch.zeros(0)

    # ------------------------------------------------------------------ per batch
    @torch.no_grad()
    def score(self, model, batch: Mapping[str, torch.Tensor]) -> list[dict]:
        """Per row of ``batch``: ``{"target_logp": float}`` plus ``"sampled_rank"`` and
        ``"sampled_negatives"`` when ``num_negatives > 0``; computed in float32 (module docstring)."""
        device = next(model.parameters()).device
        with autocast_off(device):
            return self._score(self.copies.get(model, torch.float32), batch, device)

    def _score(self, model, batch: Mapping[str, torch.Tensor], device: torch.device) -> list[dict]:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        target_logp = self.target_logps(model, batch).tolist()
        rows = [{"target_logp": float(x)} for x in target_logp]
        if self.num_negatives == 0:
            return rows
        prompts, pmask = batch["prompt_input_ids"], batch["prompt_attention_mask"].bool()
        for b, (user, target) in enumerate(zip(batch["user_ids"].tolist(), batch["target_ids"].tolist())):
            negs = self.negatives(user, target)
            scores = self.candidate_logps(model, prompts[b][pmask[b]], [self.catalog.item_seq[target], *negs])
            rows[b]["sampled_rank"] = int((scores[1:] >= scores[0]).sum())
            rows[b]["sampled_negatives"] = len(negs)
        return rows
