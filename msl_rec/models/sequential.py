"""Sequential recommenders over item indices: SASRec (as released with DROS / LLaRA) and BERT4Rec (RecBole).

Both read the same batches. Shapes: B rows, L history width (<= ``max_len``), H hidden size, I ``num_items``.

- ``history`` (B, L) int64 item indices ``0 .. I-1``, **right-padded** with ``padding_index = I``: position 0
  is the oldest item, positions ``0 .. lengths-1`` hold the row's last ``lengths`` items.
- ``lengths`` (B,) int64 in ``[1, L]``.
- ``targets`` (B,) int64 item indices (training only).

``forward(history, lengths)`` gives (B, I) scores over every item; ``train_scores(batch, generator)`` gives
the (N, I) scores and (N,) targets a loss of :mod:`msl_rec.losses.sequential` trains on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BERT4Rec", "SASRec"]

LAYER_NORM_EPS = 1e-12  # BERT4Rec's (RecBole's and BERT's); SASRec keeps torch's 1e-5, as released


def _check_size(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be a whole number >= {minimum}")
    return value


def _check_probability(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value!r}: must be a number in [0, 1)")
    return float(value)


def _check_history(model: str, history: torch.Tensor, lengths: torch.Tensor, max_len: int,
                   padding_index: int, targets: torch.Tensor | None = None) -> None:
    """Raise ValueError naming the rows when a batch breaks the contract of the module docstring.

    Positions at or after ``lengths`` may hold anything (SASRec's causal mask hides them; BERT4Rec masks them
    by ``lengths``); positions before it must hold items, else a row would read padding as its history
    (left padding, or an empty history passed as length 1). One host sync for all value checks.
    """
    if history.dim() != 2 or lengths.shape != history.shape[:1]:
        raise ValueError(f"{model}: history must be (B, L) and lengths (B,); got history {tuple(history.shape)}, "
                         f"lengths {tuple(lengths.shape)}")
    if history.dtype.is_floating_point or lengths.dtype.is_floating_point:
        raise ValueError(f"{model}: history and lengths must be integer tensors; got {history.dtype}, "
                         f"{lengths.dtype}")
    width = history.shape[1]
    if not 1 <= width <= max_len:
        raise ValueError(f"{model}: history width L={width} must be in [1, max_len={max_len}] "
                         f"(history {tuple(history.shape)})")
    inside = torch.arange(width, device=history.device) < lengths[:, None]
    bad_length = (lengths < 1) | (lengths > width)
    bad_item = ((history < 0) | (history > padding_index)).any(1)
    padding_inside = (inside & (history == padding_index)).any(1)
    bad_target = torch.zeros_like(bad_length) if targets is None else (targets < 0) | (targets >= padding_index)
    problems = torch.stack([bad_length, bad_item, padding_inside, bad_target])  # (4, B)
    if not problems.any():  # the one sync
        return
    what = ("lengths outside [1, L]", f"items outside [0, padding_index={padding_index}]",
            "padding_index before position lengths (histories must be right-padded and non-empty)",
            f"targets outside [0, num_items={padding_index})")
    first = [(w, problems[k].nonzero().flatten()[:5].tolist()) for k, w in enumerate(what) if problems[k].any()]
    detail = "; ".join(f"{w} in rows {rows}" for w, rows in first)
    raise ValueError(f"{model}: bad batch (history {tuple(history.shape)}, lengths {lengths[:8].tolist()}...): "
                     f"{detail}")


def _batch_tensors(model: str, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    missing = [k for k in ("history", "lengths", "targets") if k not in batch]
    if missing:
        raise ValueError(f"{model}.train_scores: batch lacks {missing} (has {sorted(batch)})")
    history, lengths, targets = batch["history"], batch["lengths"], batch["targets"]
    if targets.shape != history.shape[:1]:
        raise ValueError(f"{model}.train_scores: targets {tuple(targets.shape)} must be (B,) for history "
                         f"{tuple(history.shape)}")
    return history, lengths, targets


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, H) -> (B, heads, L, H / heads); head h holds channels ``h*H/heads ..`` (as torch.split does)."""
    batch, width, hidden = x.shape
    return x.view(batch, width, num_heads, hidden // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, width, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, width, heads * head_dim)


# ------------------------------------------------------------------------------------------------ SASRec
class _ReleasedAttention(nn.Module):
    """DROS ``SASRecModules_ori.MultiHeadAttention``: Q from the queries, K and V from the keys, no output
    projection, scores scaled by 1/sqrt(H) (the full hidden size, not the head size), dropout on the
    attention probabilities, residual ``+ queries``."""

    def __init__(self, hidden: int, num_heads: int, dropout: float):
        super().__init__()
        self.linear_q = nn.Linear(hidden, hidden)
        self.linear_k = nn.Linear(hidden, hidden)
        self.linear_v = nn.Linear(hidden, hidden)
        self.num_heads, self.dropout, self.scale = num_heads, dropout, hidden ** -0.5

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        """queries, keys (B, L, H); attend (B, 1, L, L) bool, True where query t may read key s."""
        q, k, v = (_split_heads(f(x), self.num_heads)
                   for f, x in ((self.linear_q, queries), (self.linear_k, keys), (self.linear_v, keys)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, scale=self.scale,
                                             dropout_p=self.dropout if self.training else 0.0)
        return _merge_heads(out) + queries


class _ReleasedFeedForward(nn.Module):
    """DROS ``PositionwiseFeedForward`` (its 1x1 Conv1d layers are Linear layers): ``LN(x + drop(W2 relu(W1 x)))``
    with inner size H."""

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.w_1 = nn.Linear(hidden, hidden)
        self.w_2 = nn.Linear(hidden, hidden)
        self.layer_norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(x + self.dropout(self.w_2(F.relu(self.w_1(x)))))


class _SASRecBlock(nn.Module):
    """One block of the released forward: ``mask * FFN(ln_2(attn(ln_1(seq), seq)))``."""

    def __init__(self, hidden: int, num_heads: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden)
        self.mh_attn = _ReleasedAttention(hidden, num_heads, dropout)
        self.ln_2 = nn.LayerNorm(hidden)
        self.feed_forward = _ReleasedFeedForward(hidden, dropout)

    def forward(self, seq: torch.Tensor, attend: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        attended = self.mh_attn(self.ln_1(seq), seq, attend)
        return self.feed_forward(self.ln_2(attended)) * keep


class SASRec(nn.Module):
    """The SASRec of DROS / LLaRA's released code (``SASRec_bce.py`` + ``SASRecModules_ori.py``).

    Item + learned positional embeddings (position 0 = oldest), embedding dropout, padding positions zeroed;
    per block ``ln_1`` -> causal multi-head attention (queries ``ln_1(seq)``, keys ``seq``, padding keys
    masked, residual) -> ``ln_2`` -> point-wise FFN (dropout, residual, its own LayerNorm) -> padding zeroed;
    then ``ln_3``. The user state is the output at position ``lengths - 1``; the scores are ``s_fc(state)``,
    a Linear(H, I) not tied to the input embeddings. The released code has one block; ``num_blocks`` repeats it.

    Padding is where ``history == padding_index`` (as released). Items after ``lengths - 1`` cannot change the
    state: the attention is causal.

    Args:
        num_items: I, real items ``0 .. I-1``; ``padding_index = I``.
        max_len: longest history (number of positional embeddings).
        hidden: H, divisible by ``num_heads``.
        num_heads, num_blocks: attention heads per block, blocks.
        dropout: embedding, attention-probability and FFN dropout.
    """

    def __init__(self, num_items: int, max_len: int = 10, hidden: int = 64, num_heads: int = 1,
                 num_blocks: int = 1, dropout: float = 0.1):
        super().__init__()
        self.num_items = _check_size("num_items", num_items, 1)
        self.max_len = _check_size("max_len", max_len, 1)
        _check_size("num_blocks", num_blocks, 1)
        if _check_size("hidden", hidden, 1) % _check_size("num_heads", num_heads, 1):
            raise ValueError(f"hidden={hidden} must be a multiple of num_heads={num_heads}")
        dropout = _check_probability("dropout", dropout)
        self.padding_index = num_items
        self.item_embeddings = nn.Embedding(num_items + 1, hidden)  # (I + 1, H): the last row is padding
        nn.init.normal_(self.item_embeddings.weight, 0, 0.01)
        self.positional_embeddings = nn.Embedding(max_len, hidden)  # torch's default N(0, 1), as released
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_SASRecBlock(hidden, num_heads, dropout) for _ in range(num_blocks))
        self.ln_3 = nn.LayerNorm(hidden)
        self.s_fc = nn.Linear(hidden, num_items)

    def encode(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, H) user state: the last block's output at position ``lengths - 1``, after ``ln_3``."""
        _check_history("SASRec", history, lengths, self.max_len, self.padding_index)
        width = history.shape[1]
        is_item = history != self.padding_index  # (B, L)
        positions = torch.arange(width, device=history.device)
        seq = self.emb_dropout(self.item_embeddings(history) + self.positional_embeddings(positions))
        keep = is_item.unsqueeze(-1).to(seq.dtype)
        seq = seq * keep
        causal = torch.ones(width, width, dtype=torch.bool, device=history.device).tril()
        # Query t reads items 0..t; key 0 is always an item (checked), so no row is fully masked. The
        # released code also zeroes the attention of padding queries: their rows are zeroed by ``keep``
        # after the FFN and never read by an item's row, so that changes no state.
        attend = (causal & is_item[:, None, :]).unsqueeze(1)  # (B, 1, L, L)
        for block in self.blocks:
            seq = block(seq, attend, keep)
        state = seq[torch.arange(len(history), device=history.device), lengths - 1]
        return self.ln_3(state)  # per-position LayerNorm: applying it after the gather changes nothing

    def forward(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, I) scores of every item as the next one."""
        return self.s_fc(self.encode(history, lengths))

    def train_scores(self, batch: dict, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (B, I), targets (B,)): one row per training window. ``generator`` is unused (dropout
        draws from torch's global RNG)."""
        history, lengths, targets = _batch_tensors("SASRec", batch)
        return self(history, lengths), targets


# ---------------------------------------------------------------------------------------------- BERT4Rec
class _BidirectionalLayer(nn.Module):
    """RecBole's ``TransformerLayer`` (post-LN): ``h = LN(x + drop(dense(attn(x))))``,
    ``out = LN(h + drop(W2 gelu(W1 h)))``; attention scaled by 1/sqrt(head size), dropout on its
    probabilities, padding keys masked."""

    def __init__(self, hidden: int, num_heads: int, inner: int, dropout: float, attn_dropout: float,
                 eps: float):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.dense = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.dense_1 = nn.Linear(hidden, inner)
        self.dense_2 = nn.Linear(inner, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.num_heads, self.attn_dropout = num_heads, attn_dropout

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        """x (B, L, H); attend (B, 1, 1, L) bool, True for the keys every query may read."""
        q, k, v = (_split_heads(f(x), self.num_heads) for f in (self.query, self.key, self.value))
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=attend,
                                                 dropout_p=self.attn_dropout if self.training else 0.0)
        h = self.attn_norm(x + self.dropout(self.dense(_merge_heads(context))))
        return self.ffn_norm(h + self.dropout(self.dense_2(F.gelu(self.dense_1(h)))))


class BERT4Rec(nn.Module):
    """BERT4Rec (Sun et al. 2019) as RecBole builds it, with RecBole's recommended settings as defaults.

    Input ``LN(item + position embedding)`` and dropout, ``num_blocks`` bidirectional post-LN transformer
    layers (GELU, LayerNorm eps 1e-12), then the paper's output layer as RecBole 1.2 has it:
    ``LN(gelu(W h + b)) @ E[:I].T + output_bias``, with E the input item embeddings (tied). Init N(0, 0.02)
    for embeddings and Linear weights, zero biases.

    Sequences are history + one more position (the target in training, ``[MASK]`` in evaluation), so there
    are ``max_len + 1`` positions. Keys at or after ``lengths + 1`` are masked (by ``lengths``, not by content).

    Cloze training (:meth:`train_scores`): over the sequence ``history + target``, each real position is
    replaced by ``[MASK]`` with probability ``mask_prob``; a row where none was drawn gets its last position
    (the target) masked, so every row trains and the evaluation's shape (``[MASK]`` right after the
    history) is trained too. Plain ``[MASK]`` replacement (RecBole; no BERT 80/10/10).

    Args:
        num_items: I, real items ``0 .. I-1``; ``padding_index = I``, ``mask_index = I + 1``.
        max_len: longest history.
        hidden, num_heads, num_blocks, inner: H (a multiple of ``num_heads``), heads, layers, FFN size.
        dropout, attn_dropout: hidden-state and attention-probability dropout.
        mask_prob: cloze masking probability.
    """

    def __init__(self, num_items: int, max_len: int = 10, hidden: int = 64, num_heads: int = 2,
                 num_blocks: int = 2, inner: int = 256, dropout: float = 0.2, attn_dropout: float = 0.2,
                 mask_prob: float = 0.2):
        super().__init__()
        self.num_items = _check_size("num_items", num_items, 1)
        self.max_len = _check_size("max_len", max_len, 1)
        _check_size("num_blocks", num_blocks, 1)
        _check_size("inner", inner, 1)
        if _check_size("hidden", hidden, 1) % _check_size("num_heads", num_heads, 1):
            raise ValueError(f"hidden={hidden} must be a multiple of num_heads={num_heads}")
        dropout, attn_dropout = _check_probability("dropout", dropout), _check_probability("attn_dropout",
                                                                                              attn_dropout)
        self.mask_prob = _check_probability("mask_prob", mask_prob)
        self.padding_index, self.mask_index = num_items, num_items + 1
        self.item_embeddings = nn.Embedding(num_items + 2, hidden)  # (I + 2, H): items, padding, [MASK]
        self.position_embeddings = nn.Embedding(max_len + 1, hidden)
        self.input_norm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.input_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(_BidirectionalLayer(hidden, num_heads, inner, dropout, attn_dropout,
                                                        LAYER_NORM_EPS) for _ in range(num_blocks))
        self.output_ffn = nn.Linear(hidden, hidden)
        self.output_norm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.output_bias = nn.Parameter(torch.zeros(num_items))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _hidden(self, seq: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """seq (B, S) indices incl. padding / [MASK]; visible (B, S) bool keys -> (B, S, H) last layer."""
        positions = torch.arange(seq.shape[1], device=seq.device)
        x = self.input_dropout(self.input_norm(self.item_embeddings(seq) + self.position_embeddings(positions)))
        attend = visible[:, None, None, :]
        for layer in self.layers:
            x = layer(x, attend)
        return x

    def _item_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, H) -> (N, I): the output layer, tied to the real items' input embeddings."""
        h = self.output_norm(F.gelu(self.output_ffn(hidden)))
        return h @ self.item_embeddings.weight[: self.num_items].T + self.output_bias

    def _with_extra_position(self, history: torch.Tensor, lengths: torch.Tensor, fill: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) history -> (B, L + 1) sequence with ``fill`` (B,) at position ``lengths`` and padding after;
        and its (B, L + 1) bool mask of the positions ``0 .. lengths``."""
        rows = torch.arange(len(history), device=history.device)
        seq = F.pad(history, (0, 1), value=self.padding_index)
        visible = torch.arange(seq.shape[1], device=seq.device) <= lengths[:, None]
        seq = seq.masked_fill(~visible, self.padding_index)
        seq[rows, lengths] = fill
        return seq, visible

    def forward(self, history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, I) scores at a ``[MASK]`` placed right after each history."""
        _check_history("BERT4Rec", history, lengths, self.max_len, self.padding_index)
        seq, visible = self._with_extra_position(history, lengths, torch.full_like(lengths, self.mask_index))
        hidden = self._hidden(seq, visible)
        return self._item_scores(hidden[torch.arange(len(history), device=history.device), lengths])

    def cloze_mask(self, visible: torch.Tensor, lengths: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, L + 1) bool: the positions to mask. Each real position (``visible``) with probability
        ``mask_prob``, drawn with ``generator`` (torch's global RNG when None); a row with none drawn gets
        position ``lengths`` (the target) instead."""
        device = generator.device if generator is not None else visible.device
        draw = torch.rand(visible.shape, generator=generator, device=device).to(visible.device)
        masked = (draw < self.mask_prob) & visible
        none = ~masked.any(1)
        rows = torch.arange(len(visible), device=visible.device)
        masked[rows, lengths] |= none
        return masked

    def train_scores(self, batch: dict, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (N, I), targets (N,)): the masked positions of every ``history + target`` sequence,
        row-major; targets are the original items there."""
        history, lengths, targets = _batch_tensors("BERT4Rec", batch)
        _check_history("BERT4Rec", history, lengths, self.max_len, self.padding_index, targets)
        seq, visible = self._with_extra_position(history, lengths, targets)
        masked = self.cloze_mask(visible, lengths, generator)
        hidden = self._hidden(seq.masked_fill(masked, self.mask_index), visible)
        return self._item_scores(hidden[masked]), seq[masked]
