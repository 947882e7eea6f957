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

import numpy as np
import torch

from msl_rec.decoding import prefix_attention
from msl_rec.decoding.base import Decoder, Ranking

MASK_MODES = ("before", "after")
SHARED_PROMPT_MODELS = ("llama",)  # attention = rotary + (GQA) softmax(q k^T * scaling) v, no sliding window
EARLY_STOPPING = (False, True, "never")


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
    """

    needs_model = True

    def __init__(self, catalog, num_beams: int = 10, mask: str = "before", length_penalty: float = 1.0,
                 max_new_tokens: int = 64, early_stopping: bool | str = False,
                 top_k: Sequence[int] = (1, 5, 10), shared_prompt: bool | None = None):
        if mask not in MASK_MODES:
            raise ValueError(f"decoder.mask must be one of {MASK_MODES}, got {mask!r}")
        if early_stopping not in EARLY_STOPPING:
            raise ValueError(f"decoder.early_stopping must be one of {EARLY_STOPPING}, got {early_stopping!r}")
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
        self.eos_id = int(catalog.eos_id)
        self._ptr, self._child_tok, self._child_node = _trie_arrays(catalog)
        self._fanout = np.diff(self._ptr)

    def __repr__(self) -> str:
        return (f"ConstrainedBeamSearch(num_beams={self.num_beams}, mask={self.mask!r}, "
                f"length_penalty={self.length_penalty}, max_new_tokens={self.max_new_tokens})")

    # ------------------------------------------------------------------ model calls
    @staticmethod
    def _forward(model, **kwargs):
        """One forward pass; asks for the last position's logits only where the model supports it."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrapper
        if "logits_to_keep" in inspect.signature(base.forward).parameters:
            kwargs["logits_to_keep"] = 1
        return model(**kwargs)

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

    # ------------------------------------------------------------------ search
    @torch.no_grad()
    def rank(self, model, batch: Mapping[str, torch.Tensor]) -> list[Ranking]:
        configs = self._attn_configs(model) if self.shared_prompt is not False else None
        if self.shared_prompt and configs is None:
            raise ValueError("decoder.shared_prompt=True needs a LLaMA-family model "
                             f"({', '.join(SHARED_PROMPT_MODELS)})")
        return self._rank(model, batch, configs)

    def _rank(self, model, batch, attn_configs) -> list[Ranking]:
        device = next(model.parameters()).device
        ids = batch["prompt_input_ids"].to(device)
        attn = batch["prompt_attention_mask"].to(device).long()
        out = self._forward(model, input_ids=ids, attention_mask=attn,
                            position_ids=(attn.cumsum(-1) - 1).clamp(min=0), use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1, :].float()
        del out
        next_pos = attn.sum(-1)
        state = None
        if attn_configs is not None:  # prompt KV kept once per user; generated KV per beam row
            state = prefix_attention.PrefixState([(layer.keys, layer.values) for layer in cache.layers], attn)
            cache = None
            prefix_attention.register()
            saved = [c._attn_implementation for c in attn_configs]
        try:
            return self._search(model, logits, next_pos, attn, cache, state, attn_configs)
        finally:
            if state is not None:
                for c, impl in zip(attn_configs, saved):
                    c._attn_implementation = impl

    def _search(self, model, logits, next_pos, attn, cache, state, attn_configs) -> list[Ranking]:
        device = logits.device
        n_users = logits.shape[0]
        head = self._plain_head(model) if (state is not None and self.mask == "before") else None
        K, lp, eos = self.num_beams, self.length_penalty, self.eos_id
        if state is not None:
            for c in attn_configs:
                c._attn_implementation = prefix_attention.IMPL  # position id of the next token, per row

        users = np.arange(n_users)          # original user index of each live user
        row_user = np.arange(n_users)       # live-user index (0..len(users)-1) of each row
        nodes = np.zeros(n_users, dtype=np.int64)
        scores = torch.zeros(n_users, device=device)
        finished: list[list[tuple[float, int]]] = [[] for _ in range(n_users)]

        for step in range(self.max_new_tokens):
            gen_len = step + 1
            n_rows, n_live = len(nodes), len(users)
            # candidates: every (row, child token), rows grouped by user, tokens sorted
            counts = self._fanout[nodes]
            total = int(counts.sum())
            cand_row = np.repeat(np.arange(n_rows), counts)
            first = np.repeat(np.cumsum(counts) - counts, counts)
            idx = np.repeat(self._ptr[nodes], counts) + (np.arange(total) - first)
            cand_tok, cand_node = self._child_tok[idx], self._child_node[idx]
            t_row = torch.from_numpy(cand_row).to(device)
            cand_score = scores[t_row] + self._step_log_probs(
                logits, t_row, torch.from_numpy(cand_tok).to(device), n_rows)

            # per user, the top 2K candidates (sorted), as in _get_top_k_continuations
            cand_user = row_user[cand_row]
            ucount = np.bincount(cand_user, minlength=n_live)
            ustart = np.cumsum(ucount) - ucount
            width = int(ucount.max())
            grid = torch.full((n_live, width), -math.inf, device=device)
            grid[torch.from_numpy(cand_user).to(device),
                 torch.from_numpy(np.arange(total) - ustart[cand_user]).to(device)] = cand_score
            top_val, top_pos = torch.topk(grid, k=min(2 * K, width), dim=1)
            top_val, top_pos = top_val.cpu().numpy(), top_pos.cpu().numpy()
            valid = np.isfinite(top_val)
            flat = np.where(valid, ustart[:, None] + top_pos, 0)
            is_eos = valid & (cand_tok[flat] == eos)

            # finished hypotheses: EOS among each user's top K candidates (_update_finished_beams)
            denom = gen_len ** lp
            for u, j in zip(*np.nonzero(is_eos[:, :K])):
                hyps = finished[users[u]]
                hyps.append((float(top_val[u, j]) / denom, int(self.catalog.sequence_at(int(cand_node[flat[u, j]])))))
                if len(hyps) > K:
                    hyps.sort(key=lambda h: -h[0])
                    del hyps[K:]

            # running beams: the best K non-EOS candidates per user
            cont = valid & ~is_eos
            cont &= np.cumsum(cont, axis=1) <= K
            if step + 1 == self.max_new_tokens:
                break
            # stopping heuristic per user (_check_early_stop_heuristic), sticky once satisfied
            hyp_len = self.max_new_tokens if (self.early_stopping == "never" and lp > 0) else gen_len
            keep_user = cont.any(axis=1)
            for u in np.nonzero(keep_user)[0]:
                hyps = finished[users[u]]
                if len(hyps) < K:
                    continue
                if self.early_stopping is True:
                    keep_user[u] = False
                    continue
                best_running = float(top_val[u, np.argmax(cont[u])]) / hyp_len ** lp
                keep_user[u] = best_running > min(h[0] for h in hyps)
            cont &= keep_user[:, None]
            if not cont.any():
                break

            sel_user, sel_col = np.nonzero(cont)  # row-major: grouped by user, best first
            sel = flat[sel_user, sel_col]
            new_live = np.cumsum(keep_user) - 1
            if state is not None and not keep_user.all():
                state.drop_users(torch.from_numpy(np.nonzero(keep_user)[0]).to(device))
            users, row_user = users[keep_user], new_live[sel_user]
            nodes = cand_node[sel]
            scores = torch.from_numpy(top_val[sel_user, sel_col]).to(device)
            src = torch.from_numpy(cand_row[sel]).to(device)

            pos = next_pos[src]
            next_pos = pos + 1
            step_ids = torch.from_numpy(cand_tok[sel]).to(device)[:, None]
            if state is not None:
                state.set_rows(torch.from_numpy(row_user).to(device), src, len(users))
                if head is not None and int(self._fanout[nodes].sum()) * 4 < len(sel) * head[1].shape[0]:
                    # only the valid tokens' logits are needed: skip the full-vocabulary output layer
                    hidden = head[0](input_ids=step_ids, position_ids=pos[:, None], use_cache=False,
                                     prefix_state=state).last_hidden_state[:, -1, :]
                    logits = (hidden, head[1])
                    continue
                out = self._forward(model, input_ids=step_ids, position_ids=pos[:, None], use_cache=False,
                                    prefix_state=state)
            else:
                cache.reorder_cache(src)
                attn = torch.cat([attn[src], attn.new_ones(len(sel), 1)], dim=1)
                out = self._forward(model, input_ids=step_ids, attention_mask=attn, position_ids=pos[:, None],
                                    past_key_values=cache, use_cache=True)
                cache = out.past_key_values
            logits = out.logits[:, -1, :].float()
            del out

        return [[(seq, score) for score, seq in sorted(h, key=lambda h: -h[0])] for h in finished]
