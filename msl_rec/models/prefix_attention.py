"""Shared-prompt attention for beam decoding: every beam of a user reads the user's prompt KV in place.

The prompts are prefilled once (``B`` rows). During the beam steps the model runs with the attention
implementation :data:`IMPL` (registered with transformers' ``AttentionInterface``), without a
transformers cache: each layer's attention call receives the new token's query/key/value for the
``R`` live beam rows and a :class:`PrefixState` (passed as the ``prefix_state`` keyword, which the
LLaMA-family forwards hand through to the attention function). The state holds

* the prompt KV of the live users, ``(U, Hkv, Tp, d)`` per layer (never copied per beam), with an
  additive padding bias ``(U, Tp)``;
* the generated KV of every beam row, ``(R, Hkv, t, d)`` per layer, re-gathered by the beam
  back-pointers (small: ``t <= max_new_tokens``).

A beam row's query attends jointly to its user's prompt keys and its own generated keys, one
softmax over both (the same attention as a full cache holding prompt + generated tokens).
Rows are grouped by user, best first; users may have fewer than ``Kmax`` rows, so the prompt part
runs on a padded ``(U, Kmax)`` layout (a view when every user has exactly ``Kmax`` rows).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AttentionInterface

IMPL = "msl_prefix_beam"
_registered = False


def register() -> None:
    """Register :data:`IMPL` with transformers (idempotent). No mask function is registered, so
    transformers' ``create_causal_mask`` returns no mask for it (the state carries its own)."""
    global _registered
    if _registered:
        return
    AttentionInterface.register(IMPL, prefix_attention_forward)
    _registered = True


class PrefixState:
    """Prompt KV of the live users plus the generated KV of the beam rows (see module docstring)."""

    def __init__(self, prompt_kv: list[tuple[torch.Tensor, torch.Tensor]], prompt_mask: torch.Tensor):
        self.prompt_kv = prompt_kv  # per layer (U, Hkv, Tp, d)
        bias = torch.zeros(prompt_mask.shape, dtype=prompt_kv[0][0].dtype, device=prompt_mask.device)
        self.prompt_bias = bias.masked_fill(prompt_mask == 0, float("-inf"))  # (U, Tp)
        self.gen_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(prompt_kv)
        self.src: torch.Tensor | None = None  # pending beam reorder of the generated KV
        self.row_user = self.row_slot = None
        self.kmax, self.dense = 1, True

    def drop_users(self, keep: torch.Tensor) -> None:
        """Keep only the users ``keep`` (indices into the current live users)."""
        self.prompt_kv = [(k.index_select(0, keep), v.index_select(0, keep)) for k, v in self.prompt_kv]
        self.prompt_bias = self.prompt_bias.index_select(0, keep)

    def set_rows(self, row_user: np.ndarray, src: np.ndarray, n_users: int) -> None:
        """Beam rows for the next step, as host arrays: live-user index of each row (grouped by user,
        ascending) and the previous row each one continues (indexes the generated KV of the previous
        step). The layout facts are derived on the host, so no device sync happens here."""
        counts = np.bincount(row_user, minlength=n_users)
        device = self.prompt_bias.device
        self.kmax = int(counts.max())
        self.dense = bool((counts == self.kmax).all())
        self.row_user = torch.from_numpy(row_user).to(device)
        self.row_slot = torch.from_numpy(np.arange(len(row_user)) - (np.cumsum(counts) - counts)[row_user]).to(device)
        prev = self.gen_kv[0]
        identity = prev is not None and len(src) == prev[0].shape[0] and bool((src == np.arange(len(src))).all())
        self.src = None if identity else torch.from_numpy(src).to(device)  # None: nothing to reorder

    def to_users(self, x: torch.Tensor, n_users: int) -> torch.Tensor:
        """Rows ``(R, ...)`` -> ``(U, kmax, ...)`` by (user, slot), zeros in the unused slots."""
        if self.dense:
            return x.reshape(n_users, self.kmax, *x.shape[1:])
        out = x.new_zeros(n_users, self.kmax, *x.shape[1:])
        out[self.row_user, self.row_slot] = x
        return out

    def to_rows(self, y: torch.Tensor) -> torch.Tensor:
        """``(U, kmax, ...)`` -> rows ``(R, ...)``: the inverse of :meth:`to_users`."""
        return y.reshape(-1, *y.shape[2:]) if self.dense else y[self.row_user, self.row_slot]


def prefix_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             prefix_state: PrefixState | None = None, **kwargs):
    """query (R, H, 1, d); key/value (R, Hkv, 1, d) of the new token. Returns ((R, 1, H, d), None)."""
    st = prefix_state
    if st is None:
        raise RuntimeError(f"attention implementation {IMPL!r} needs the prefix_state keyword")
    layer = module.layer_idx
    R, H, q_len, d = query.shape
    if q_len != 1:
        raise RuntimeError(f"{IMPL!r} decodes one token per row, got {q_len}")
    pk, pv = st.prompt_kv[layer]
    U, Hkv, Tp, _ = pk.shape
    G = H // Hkv
    if scaling is None:
        scaling = d ** -0.5

    # generated KV of each row: previous rows' (re-gathered) plus this token
    prev = st.gen_kv[layer]
    if prev is None:
        gk, gv = key, value
    else:
        ok, ov = prev
        if st.src is not None:
            ok, ov = ok.index_select(0, st.src), ov.index_select(0, st.src)
        gk, gv = torch.cat([ok, key], dim=2), torch.cat([ov, value], dim=2)
    st.gen_kv[layer] = (gk, gv)

    q = query.reshape(R, Hkv, G, d)  # q_len == 1
    # prompt part on the (U, Kmax) layout: (U, Hkv, Kmax*G, d) @ (U, Hkv, d, Tp)
    K = st.kmax
    q_pad = st.to_users(q, U).permute(0, 2, 1, 3, 4).reshape(U, Hkv, K * G, d)
    s_p = torch.matmul(q_pad, pk.transpose(-1, -2)) * scaling  # (U, Hkv, K*G, Tp)
    s_p = s_p + st.prompt_bias[:, None, None, :]
    s_p = s_p.reshape(U, Hkv, K, G, Tp).permute(0, 2, 1, 3, 4)  # (U, K, Hkv, G, Tp)
    s_p = st.to_rows(s_p)
    # generated part: (R, Hkv, G, d) @ (R, Hkv, d, t)
    s_g = torch.matmul(q, gk.transpose(-1, -2)) * scaling  # (R, Hkv, G, t)

    probs = torch.softmax(torch.cat([s_p, s_g], dim=-1), dim=-1)
    p_p, p_g = probs[..., :Tp], probs[..., Tp:]
    out = torch.matmul(p_g, gv)  # (R, Hkv, G, d)
    p_pad = st.to_users(p_p, U).permute(0, 2, 1, 3, 4).reshape(U, Hkv, K * G, Tp)
    o_p = torch.matmul(p_pad, pv).reshape(U, Hkv, K, G, d).permute(0, 2, 1, 3, 4)  # (U, K, Hkv, G, d)
    o_p = st.to_rows(o_p)
    out = out + o_p
    return out.reshape(R, 1, H, d), None
