"""Constrained beam search over the catalog trie, batched and with a shared prompt prefill.

Every beam sits on a trie node; its candidates are the node's children, so only valid titles can
be produced and a beam ends when it takes EOS (a leaf). Two ways to constrain a step:

* ``mask="before"`` (config ``cbs_masked``): invalid tokens are set to -inf *before* the
  log-softmax, so each step is renormalised over the valid set. A finished beam's score with
  ``length_penalty=0`` is ``log P_valid(item | prompt)``, the quantity MSL trains.
* ``mask="after"`` (config ``cbs``): log-softmax over the full vocabulary, then invalid tokens
  dropped -- what ``generate(prefix_allowed_tokens_fn=...)`` does.

Selection mirrors transformers 5.x ``GenerationMixin._beam_search`` (checked against 5.23), so the
results equal ``generate(num_beams=K, num_return_sequences=K, prefix_allowed_tokens_fn=...)``
(plus ``renormalize_logits=True`` for ``mask="before"``), restricted to real finished beams:

1. each step, the candidates (beam, token) are scored ``beam score + log p(token)``, and the top
  ``2K`` are kept (1 EOS id);
2. an EOS candidate among the top ``K`` of those becomes a finished hypothesis, scored
  ``sum of log-probs (EOS included) / generated_len ** length_penalty``; EOS candidates ranked
  ``K..2K`` are dropped; the best ``K`` finished hypotheses are kept;
3. the best ``K`` non-EOS candidates continue as the running beams;
4. after each step, with ``early_stopping=False`` (the default), a user stops once all ``K``
  finished slots are filled and ``best running score / generated_len ** length_penalty`` is no
  better than the worst finished score (``"never"`` with a positive penalty uses
  ``max_new_tokens`` as the length; ``True`` stops as soon as ``K`` are finished). Once stopped, a
  user accepts no more hypotheses.

Differences from ``generate`` that do not change real results: transformers pads the beam set with
``-1e9``-scored dummy beams (and may return them when fewer than ``K`` titles finish); here a user
just has fewer beams. Beams cut off by ``max_new_tokens`` are not returned (they are no title).

Search only: every model computation comes from the inference runner it is handed (``lm``, a
:class:`msl_rec.models.inference.LMRunner`): ``lm.encode_prompts`` (each user's prompt KV, once),
``lm.beam_rows(prompts)`` (rows continuing it one token each, ``log_probs`` of candidate tokens and
``advance``). Every step feeds one token per live beam (rows can grow from ``B`` to ``B*K`` and shrink
as users finish); the trie is read through ``catalog.children_csr()``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from msl_rec.decoding.base import LMDecoder, Ranking
from msl_rec.utils.precision import eval_dtype

MASK_MODES = ("before", "after")
EARLY_STOPPING = (False, True, "never")


def users_going_on(search, finished, users, top_val, cont, gen_len: int) -> np.ndarray:
    """Per live user, whether a beam search keeps searching (transformers' ``_check_early_stop_heuristic``):
    it has running beams and, once K hypotheses are finished, its best running beam could still beat the
    worst. ``search``: a beam search with ``num_beams``, ``length_penalty``, ``max_new_tokens`` and
    ``early_stopping`` (:class:`ConstrainedBeamSearch`, :class:`~msl_rec.decoding.grounding.Grounding`);
    ``finished``: per user its (score, ...) hypotheses; ``top_val``/``cont``: (U, 2K) candidate scores and
    which of them continue."""
    K, lp = search.num_beams, search.length_penalty
    hyp_len = search.max_new_tokens if (search.early_stopping == "never" and lp > 0) else gen_len
    keep = cont.any(axis=1)
    for u in np.nonzero(keep)[0]:
        hyps = finished[users[u]]
        if len(hyps) < K:
            continue
        if search.early_stopping is True:
            keep[u] = False
            continue
        best_running = float(top_val[u, np.argmax(cont[u])]) / hyp_len ** lp
        keep[u] = best_running > min(h[0] for h in hyps)
    return keep


@dataclass
class _Beams:
    """The live search state (host side). Rows (beams) are grouped by user, best first."""

    users: np.ndarray          # original batch index of each live user
    row_user: np.ndarray       # live-user index of each row
    nodes: np.ndarray          # trie node of each row
    scores: torch.Tensor       # (rows,) sum of log-probs so far
    rows: object               # the runner's BeamRows: the model side of the rows


class ConstrainedBeamSearch(LMDecoder):
    """Beam search restricted to catalog titles (see the module docstring for the exact rules).

    Args:
        catalog: the :class:`~msl_rec.data.catalog.ItemCatalog` whose trie constrains decoding.
        num_beams: beams per user, and the most sequences returned per user.
        mask: ``"before"`` renormalises each step over the valid tokens; ``"after"`` does not.
        length_penalty: finished score = sum of log-probs / generated_len ** length_penalty.
        max_new_tokens: hard cap on response length (EOS included).
        early_stopping: transformers' ``early_stopping`` (False, True or "never").
        top_k: the cut-offs the decoder is evaluated at; each must be <= ``num_beams``.
        shared_prompt: ``None`` (auto) reads each user's prompt KV in place from every beam through a
            custom attention function (:mod:`msl_rec.models.prefix_attention`) for LLaMA-family
            models, else re-gathers a full KV cache per step; ``True`` / ``False`` force either path.
        dtype: the weights' dtype during decoding, ``"float32"`` (the default and the configs': the same
            rankings on every machine) or ``"bfloat16"`` (an explicit, faster choice where bf16 is
            native; scores differ by up to ~0.1 and rankings can change). ``"auto"`` is refused
            (:func:`~msl_rec.utils.precision.eval_dtype`). A model in another dtype is decoded through a
            frozen, adapter-merged copy in this one; an enclosing autocast (Lightning's ``bf16-mixed``)
            is disabled while decoding; logits, log-softmax and scores are always fp32.
            :attr:`compute_dtype` says which was used.
        share_preamble: compute the prompt start every user of a batch shares (the Alpaca header and
            instruction) once per weights version and reuse its KV for every batch.

    ``dtype``, ``shared_prompt`` and ``share_preamble`` are settings of the inference runner the
    search is handed (:class:`msl_rec.models.inference.CausalLMInference`, built from them by
    :class:`msl_rec.evaluation.predict.BatchPredictor`); the search itself never touches the model.
    """

    needs_model = True

    def __init__(self, catalog, num_beams: int = 10, mask: str = "before", length_penalty: float = 1.0,
                 max_new_tokens: int = 64, early_stopping: bool | str = False,
                 top_k: Sequence[int] = (1, 5, 10), shared_prompt: bool | None = None, dtype: str = "float32",
                 share_preamble: bool = True):
        if mask not in MASK_MODES:
            raise ValueError(f"decoder.mask must be one of {MASK_MODES}, got {mask!r}")
        if early_stopping not in EARLY_STOPPING:
            raise ValueError(f"decoder.early_stopping must be one of {EARLY_STOPPING}, got {early_stopping!r}")
        eval_dtype(dtype, "decoder.dtype")  # dtype=auto (machine-dependent metrics) is an error here already
        if num_beams < 1 or max_new_tokens < 1:
            raise ValueError("decoder.num_beams and decoder.max_new_tokens must be >= 1")
        self.top_k = tuple(int(k) for k in top_k)
        if self.top_k and max(self.top_k) > num_beams:
            raise ValueError(f"decoder.top_k {list(self.top_k)} needs num_beams >= {max(self.top_k)}, got {num_beams}")
        self.catalog = catalog
        self.num_beams = int(num_beams)
        self.mask = mask
        self.length_penalty = float(length_penalty)
        self.max_new_tokens = int(max_new_tokens)
        self.early_stopping = early_stopping
        self.shared_prompt = shared_prompt
        self.dtype = dtype
        self.share_preamble = bool(share_preamble)
        self.eos_id = int(catalog.eos_id)
        self._ptr, self._child_tok, self._child_node = catalog.children_csr()
        self._fanout = np.diff(self._ptr)

    def __repr__(self) -> str:
        return (f"ConstrainedBeamSearch(num_beams={self.num_beams}, mask={self.mask!r}, "
                f"length_penalty={self.length_penalty}, max_new_tokens={self.max_new_tokens}, dtype={self.dtype!r})")

    @property
    def compute_dtype(self) -> str:
        """The dtype the model's weights and activations are in while decoding (``"float32"`` or
        ``"bfloat16"``), whatever the model's own dtype or an enclosing autocast: what to record
        beside the metrics. Logits, log-softmax and beam scores are fp32 in both."""
        return self.dtype

    # ------------------------------------------------------------------ search
    def search(self, lm, prompts) -> list[Ranking]:
        """The beam steps (module docstring, rules 1-4) over encoded prompts (``lm.encode_prompts``);
        one device->host copy per step (the top candidates), everything else on the host is
        bookkeeping over trie arrays."""
        K, n_users = self.num_beams, len(prompts)
        rows = lm.beam_rows(prompts)
        beams = _Beams(users=np.arange(n_users), row_user=np.arange(n_users), nodes=np.zeros(n_users, dtype=np.int64),
                       scores=torch.zeros(n_users, device=rows.device), rows=rows)
        finished: list[list[tuple[float, int]]] = [[] for _ in range(n_users)]
        for step in range(self.max_new_tokens):
            gen_len = step + 1
            cand_row, cand_tok, cand_node = self._candidates(beams.nodes)
            t_row = torch.from_numpy(cand_row).to(beams.scores.device)
            cand_score = beams.scores[t_row] + rows.log_probs(cand_row, cand_tok, renormalize=self.mask == "before")
            top_val, flat = self._top_per_user(cand_score, beams.row_user[cand_row], len(beams.users))
            valid = np.isfinite(top_val)
            is_eos = valid & (cand_tok[flat] == self.eos_id)
            self._add_finished(finished, beams.users, top_val, cand_node[flat], is_eos[:, :K], gen_len)
            if gen_len == self.max_new_tokens:
                break
            # running beams: the best K non-EOS candidates of each user that goes on
            cont = valid & ~is_eos
            cont &= np.cumsum(cont, axis=1) <= K
            cont &= self._users_going_on(finished, beams.users, top_val, cont, gen_len)[:, None]
            if not cont.any():
                break
            self._advance(beams, cont, top_val, flat, cand_row, cand_tok, cand_node)
        return [[(seq, score) for score, seq in sorted(h, key=lambda h: -h[0])] for h in finished]

    def _candidates(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (row, child token) of the rows' trie nodes, rows in order, tokens sorted:
        ``(row, token, child node)`` arrays."""
        counts = self._fanout[nodes]
        first = np.repeat(np.cumsum(counts) - counts, counts)
        idx = np.repeat(self._ptr[nodes], counts) + (np.arange(int(counts.sum())) - first)
        return np.repeat(np.arange(len(nodes)), counts), self._child_tok[idx], self._child_node[idx]

    def _top_per_user(self, cand_score: torch.Tensor, cand_user: np.ndarray, n_users: int):
        """Per user, its top ``2K`` candidates, best first (``_get_top_k_continuations``).

        Returns host arrays ``(score (U, 2K), candidate index (U, 2K))``; missing ones score -inf."""
        device = cand_score.device
        count = np.bincount(cand_user, minlength=n_users)
        start = np.cumsum(count) - count
        width = int(count.max())
        grid = torch.full((n_users, width), -math.inf, device=device)
        grid[torch.from_numpy(cand_user).to(device),
             torch.from_numpy(np.arange(len(cand_user)) - start[cand_user]).to(device)] = cand_score
        top_val, top_pos = torch.topk(grid, k=min(2 * self.num_beams, width), dim=1)
        top_val, top_pos = top_val.cpu().numpy(), top_pos.cpu().numpy()  # the step's one sync
        return top_val, np.where(np.isfinite(top_val), start[:, None] + top_pos, 0)

    def _add_finished(self, finished, users, top_val, top_node, is_eos, gen_len: int) -> None:
        """EOS among a user's top K candidates -> a finished hypothesis scored
        ``sum log p / gen_len ** length_penalty``; each user keeps its best K (``_update_finished_beams``)."""
        denom = gen_len ** self.length_penalty
        for u, j in zip(*np.nonzero(is_eos)):
            hyps = finished[users[u]]
            hyps.append((float(top_val[u, j]) / denom, int(self.catalog.sequence_at(int(top_node[u, j])))))
            if len(hyps) > self.num_beams:
                hyps.sort(key=lambda h: -h[0])
                del hyps[self.num_beams:]

    _users_going_on = users_going_on

    def _advance(self, beams: _Beams, cont, top_val, flat, cand_row, cand_tok, cand_node) -> None:
        """Make the chosen candidates ``cont`` (U, 2K) the running beams, drop the users with none and
        run one token per beam."""
        keep_user = cont.any(axis=1)
        sel_user, sel_col = np.nonzero(cont)  # row-major: grouped by user, best first
        sel = flat[sel_user, sel_col]
        beams.users, beams.row_user = beams.users[keep_user], (np.cumsum(keep_user) - 1)[sel_user]
        beams.nodes = cand_node[sel]
        beams.scores = torch.from_numpy(top_val[sel_user, sel_col]).to(beams.scores.device)
        beams.rows.advance(keep_user, beams.row_user, cand_row[sel], cand_tok[sel])
