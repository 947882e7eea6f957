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

Efficiency: the left-padded prompts are run once (``logits_to_keep=1``), and every step feeds one
token per live beam (rows can grow from ``B`` to ``B*K`` and shrink as users finish). For
LLaMA-family models (``shared_prompt=None``/``True``) the prompt KV is kept once per user and read in
place by all of the user's beams through a custom attention function
(:mod:`msl_rec.decoding.prefix_attention`); only the beams' generated KV (at most ``max_new_tokens``
tokens) is re-gathered per step, and with ``mask="before"`` the output layer is evaluated for the
valid tokens only. Otherwise (``shared_prompt=False`` or another architecture) the full KV cache
rows are re-gathered per step with ``Cache.reorder_cache``. For ``mask="before"`` only the valid
tokens' logits are normalised.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from msl_rec.decoding import prefix_attention
from msl_rec.decoding.base import Decoder, Ranking
from msl_rec.utils.precision import ModelCopies, autocast_off, eval_dtype, weights_version

MASK_MODES = ("before", "after")
SHARED_PROMPT_MODELS = ("llama",)  # attention = rotary + (GQA) softmax(q k^T * scaling) v, no sliding window
EARLY_STOPPING = (False, True, "never")
MIN_PREAMBLE = 8  # a shorter shared prompt start is not worth its own forward pass


@dataclass
class _Beams:
    """The live search state. Rows (beams) are grouped by user, best first."""

    users: np.ndarray          # original batch index of each live user
    row_user: np.ndarray       # live-user index of each row
    nodes: np.ndarray          # trie node of each row
    scores: torch.Tensor       # (rows,) sum of log-probs so far
    next_pos: torch.Tensor     # (rows,) position id of the row's next token
    state: prefix_attention.PrefixState | None = None  # shared-prompt path
    head: tuple | None = None  # (decoder, output weight) when only valid tokens' logits are needed
    cache: object = None       # full-cache path: transformers cache and its 2-D mask
    attn: torch.Tensor | None = None


def _trie_arrays(catalog) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR children of the catalog trie: ``(ptr, child_tok, child_node)``."""
    if all(hasattr(catalog, a) for a in ("_ptr", "_child_tok", "_child_node")):
        return catalog._ptr, catalog._child_tok, catalog._child_node
    n = catalog.num_nodes  # generic path: walk the public children() interface once
    toks, nodes, ptr = [], [], np.zeros(n + 1, dtype=np.int64)
    for node in range(n):
        t, c = catalog.children(node)
        toks.append(np.asarray(t, dtype=np.int64))
        nodes.append(np.asarray(c, dtype=np.int64))
        ptr[node + 1] = ptr[node] + len(t)
    return ptr, np.concatenate(toks), np.concatenate(nodes)


class ConstrainedBeamSearch(Decoder):
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
            custom attention function (:mod:`msl_rec.decoding.prefix_attention`) for LLaMA-family
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
        self._torch_dtype = eval_dtype(dtype, "decoder.dtype")
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
        self.copies = ModelCopies()  # the model in self.dtype; shared with the target scorer
        self._preamble = None   # (weights version, tokens, per-layer (k, v))
        self.eos_id = int(catalog.eos_id)
        self._ptr, self._child_tok, self._child_node = _trie_arrays(catalog)
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

    # ------------------------------------------------------------------ model calls
    @staticmethod
    def _logits_kwargs(model) -> dict:
        """Asks for the last position's logits only where the model supports it."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrapper
        return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}

    def _step_log_probs(self, logits: torch.Tensor, rows: torch.Tensor, toks: torch.Tensor,
                        n_rows: int) -> torch.Tensor:
        """Log-probability of each candidate (row, token) under the chosen masking."""
        if self.mask == "after":
            return torch.log_softmax(logits, dim=-1)[rows, toks]
        if isinstance(logits, tuple):  # (hidden (n_rows, D), output weight (V, D)): candidates only
            hidden, weight = logits
            sel = (hidden.float()[rows] * weight[toks].float()).sum(-1)
        else:
            sel = logits[rows, toks]
        row_max = torch.full((n_rows,), -math.inf, dtype=sel.dtype, device=sel.device)
        row_max = row_max.scatter_reduce(0, rows, sel, reduce="amax")
        sums = torch.zeros(n_rows, dtype=sel.dtype, device=sel.device).index_add_(0, rows, torch.exp(sel - row_max[rows]))
        return sel - (row_max + torch.log(sums))[rows]

    @staticmethod
    def _attn_configs(model) -> list | None:
        """The configs whose ``_attn_implementation`` the attention layers read, if the model is a
        LLaMA-family one the shared-prompt attention supports (else ``None``)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrapper
        cfg = getattr(base, "config", None)
        if getattr(cfg, "model_type", None) not in SHARED_PROMPT_MODELS:
            return None
        attn = [m for m in base.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
        if not attn or len(attn) != cfg.num_hidden_layers:
            return None
        configs = {id(cfg): cfg}
        for m in attn:
            configs.setdefault(id(m.config), m.config)
        return list(configs.values())

    @staticmethod
    def _plain_head(model):
        """``(decoder, weight)`` when logits are exactly ``decoder(...).last_hidden_state @ weight.T``
        (a LLaMA ``*ForCausalLM`` with a plain bias-free ``nn.Linear`` head), else ``None``."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder, head = getattr(base, "model", None), getattr(base, "lm_head", None)
        if type(head) is not torch.nn.Linear or head.bias is not None or decoder is None:
            return None
        if getattr(base.config, "final_logit_softcapping", None) or getattr(base.config, "logit_scale", None):
            return None
        return decoder, head.weight

    # ------------------------------------------------------------------ model state caches
    def _preamble_len(self, ids: np.ndarray, attn: np.ndarray) -> int:
        """Length of the prompt start every user in the batch shares (0 if < ``MIN_PREAMBLE`` tokens).

        At least one token per user is left out of it, so every user's last prompt position is in
        the batch's own forward pass. ``0`` unless the prompts are left-padded."""
        lengths = attn.sum(1)
        width = attn.shape[1]
        if not (attn == (np.arange(width)[None, :] >= (width - lengths)[:, None])).all():
            return 0  # not left-padded (or holes): no shared positions
        m = int(lengths.min()) - 1
        if m < MIN_PREAMBLE:
            return 0
        starts = width - lengths
        heads = ids[np.arange(len(ids))[:, None], starts[:, None] + np.arange(m)]  # (B, m) real tokens
        same = (heads == heads[:1]).all(0)
        n = m if same.all() else int(np.argmin(same))
        return n if n >= MIN_PREAMBLE else 0

    def _preamble_kv(self, model, tokens: np.ndarray, version: tuple) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(k, v)`` of shape ``(1, Hkv, P, d)`` for the prompt start ``tokens`` (positions
        ``0..P-1``), computed once per weights version. A cached longer or shorter start with the same
        first tokens is sliced (causal attention: the KV of a prefix does not depend on what follows)."""
        n = len(tokens)
        if self._preamble is not None and self._preamble[0] == version:
            cached = self._preamble[1]
            m = min(n, len(cached))
            m = m if (cached[:m] == tokens[:m]).all() else int(np.argmin(cached[:m] == tokens[:m]))
            if m == n:
                return [(k[:, :, :n], v[:, :, :n]) for k, v in self._preamble[2]]
        device = next(model.parameters()).device
        ids = torch.from_numpy(tokens).to(device)[None]
        out = model(input_ids=ids, position_ids=torch.arange(n, device=device)[None], use_cache=True,
                    **self._logits_kwargs(model))
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        self._preamble = (version, tokens.copy(), kv)
        return kv

    # ------------------------------------------------------------------ search
    @torch.no_grad()
    def rank(self, model, batch: Mapping[str, torch.Tensor]) -> list[Ranking]:
        with autocast_off(next(model.parameters()).device):  # compute_dtype, not autocast's
            return self._rank(model, batch)

    def _rank(self, model, batch: Mapping[str, torch.Tensor]) -> list[Ranking]:
        version = weights_version(model)
        model = self.copies.get(model, self._torch_dtype, version)
        configs = self._attn_configs(model) if self.shared_prompt is not False else None
        if self.shared_prompt and configs is None:
            raise ValueError("decoder.shared_prompt=True needs a LLaMA-family model "
                             f"({', '.join(SHARED_PROMPT_MODELS)})")
        logits, beams = self._prefill(model, batch, configs is not None, version)
        if beams.state is not None:
            prefix_attention.register()
            saved = [c._attn_implementation for c in configs]
            for c in configs:
                c._attn_implementation = prefix_attention.IMPL  # position id of the next token, per row
        try:
            return self._search(model, logits, beams)
        finally:
            if beams.state is not None:
                for c, impl in zip(configs, saved):
                    c._attn_implementation = impl

    def _prefill(self, model, batch, shared_prompt: bool, version: tuple) -> tuple[torch.Tensor, _Beams]:
        """Run the left-padded prompts once; return the last positions' logits ``(B, V)`` (fp32) and
        the beams' start state. With ``share_preamble`` the prompt start all users share is taken
        from :meth:`_preamble_kv` and only the rest of each prompt runs here; its KV then sits
        before the (re-padded) rest, which attention does not mind (positions come from the ids,
        padding from the mask)."""
        device = next(model.parameters()).device
        ids = batch["prompt_input_ids"].to(device)
        attn = batch["prompt_attention_mask"].to(device).long()
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        n_pre = self._preamble_len(ids.cpu().numpy(), attn.cpu().numpy()) if self.share_preamble else 0
        kwargs = {}
        if n_pre:
            n = len(ids)
            first = int(attn.shape[1] - attn.sum(1)[0])
            pre = self._preamble_kv(model, ids[0, first:first + n_pre].cpu().numpy(), version)
            rest = attn * (attn.cumsum(-1) > n_pre)  # the first n_pre real tokens -> padding
            ids, pos = ids[:, n_pre:], pos[:, n_pre:]
            attn = torch.cat([attn.new_ones(n, n_pre), rest[:, n_pre:]], dim=1)
            kwargs["past_key_values"] = DynamicCache([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1))
                                                      for k, v in pre])
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True,
                    **kwargs, **self._logits_kwargs(model))
        cache = out.past_key_values
        logits = out.logits[:, -1, :].float()
        del out
        n_users = len(logits)
        beams = _Beams(users=np.arange(n_users), row_user=np.arange(n_users), nodes=np.zeros(n_users, dtype=np.int64),
                       scores=torch.zeros(n_users, device=device), next_pos=pos[:, -1] + 1)
        if shared_prompt:  # prompt KV kept once per user; generated KV per beam row
            beams.state = prefix_attention.PrefixState([(layer.keys, layer.values) for layer in cache.layers], attn)
            beams.head = self._plain_head(model) if self.mask == "before" else None
        else:
            beams.cache, beams.attn = cache, attn
        return logits, beams

    def _search(self, model, logits: torch.Tensor, beams: _Beams) -> list[Ranking]:
        """The beam steps (module docstring, rules 1-4); one device->host copy per step (the top
        candidates), everything else on the host is bookkeeping over trie arrays."""
        K = self.num_beams
        finished: list[list[tuple[float, int]]] = [[] for _ in range(len(beams.users))]
        for step in range(self.max_new_tokens):
            gen_len = step + 1
            cand_row, cand_tok, cand_node = self._candidates(beams.nodes)
            t_row = torch.from_numpy(cand_row).to(beams.scores.device)
            cand_score = beams.scores[t_row] + self._step_log_probs(
                logits, t_row, torch.from_numpy(cand_tok).to(t_row.device), len(beams.nodes))
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
            logits = self._advance(model, beams, cont, top_val, flat, cand_row, cand_tok, cand_node)
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

    def _users_going_on(self, finished, users, top_val, cont, gen_len: int) -> np.ndarray:
        """Per live user, whether it keeps searching (``_check_early_stop_heuristic``): it has running
        beams and, once K hypotheses are finished, its best running beam could still beat the worst."""
        K, lp = self.num_beams, self.length_penalty
        hyp_len = self.max_new_tokens if (self.early_stopping == "never" and lp > 0) else gen_len
        keep = cont.any(axis=1)
        for u in np.nonzero(keep)[0]:
            hyps = finished[users[u]]
            if len(hyps) < K:
                continue
            if self.early_stopping is True:
                keep[u] = False
                continue
            best_running = float(top_val[u, np.argmax(cont[u])]) / hyp_len ** lp
            keep[u] = best_running > min(h[0] for h in hyps)
        return keep

    def _advance(self, model, beams: _Beams, cont, top_val, flat, cand_row, cand_tok, cand_node) -> torch.Tensor:
        """Make the chosen candidates ``cont`` (U, 2K) the running beams, drop the users with none,
        reorder the generated KV and run one token per beam. Returns the next logits (or, for the
        output layer restricted to the valid tokens, ``(hidden, output weight)``)."""
        device = beams.scores.device
        keep_user = cont.any(axis=1)
        sel_user, sel_col = np.nonzero(cont)  # row-major: grouped by user, best first
        sel = flat[sel_user, sel_col]
        if beams.state is not None and not keep_user.all():
            beams.state.drop_users(torch.from_numpy(np.nonzero(keep_user)[0]).to(device))
        beams.users, beams.row_user = beams.users[keep_user], (np.cumsum(keep_user) - 1)[sel_user]
        beams.nodes = cand_node[sel]
        beams.scores = torch.from_numpy(top_val[sel_user, sel_col]).to(device)
        src = cand_row[sel]
        t_src = torch.from_numpy(src).to(device)
        pos = beams.next_pos[t_src]
        beams.next_pos = pos + 1
        step_ids = torch.from_numpy(cand_tok[sel]).to(device)[:, None]
        if beams.state is None:  # full KV cache rows re-gathered
            beams.cache.reorder_cache(t_src)
            beams.attn = torch.cat([beams.attn[t_src], beams.attn.new_ones(len(sel), 1)], dim=1)
            out = model(input_ids=step_ids, attention_mask=beams.attn, position_ids=pos[:, None],
                        past_key_values=beams.cache, use_cache=True, **self._logits_kwargs(model))
            beams.cache = out.past_key_values
            return out.logits[:, -1, :].float()
        beams.state.set_rows(beams.row_user, src, len(beams.users))
        head = beams.head
        if head is not None and int(self._fanout[beams.nodes].sum()) * 4 < len(sel) * head[1].shape[0]:
            # only the valid tokens' logits are needed: skip the full-vocabulary output layer
            hidden = head[0](input_ids=step_ids, position_ids=pos[:, None], use_cache=False,
                             prefix_state=beams.state).last_hidden_state[:, -1, :]
            return hidden, head[1]
        out = model(input_ids=step_ids, position_ids=pos[:, None], use_cache=False, prefix_state=beams.state,
                    **self._logits_kwargs(model))
        return out.logits[:, -1, :].float()
