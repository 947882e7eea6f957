"""Random response batches with ragged valid sets, and dense references written from the equations."""

from __future__ import annotations

import torch

from msl_rec.losses import ResponseBatch

V, D, EOS = 40, 6, 39


def make_batch(num_seqs: int = 4, positions: int = 4, scale: float = 1.0, seed: int = 0,
               ties: bool = False, dtype=torch.float32) -> ResponseBatch:
    """``num_seqs`` responses of ``positions`` tokens; the last label of each is EOS.

    Valid-set sizes are ragged (1 .. 12, some positions with a single valid token); with ``ties``
    several tokens share one embedding, so their logits tie exactly.
    """
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64)
    if ties:
        weight[1:6] = weight[0]
    hidden = torch.randn(num_seqs * positions, D, generator=g, dtype=torch.float64) * scale
    n = num_seqs * positions
    sizes = torch.randint(1, 13, (n,), generator=g)
    sizes[::5] = 1
    k = int(sizes.max())
    valid_ids = torch.full((n, k), -1, dtype=torch.long)
    labels = torch.empty(n, dtype=torch.long)
    for i in range(n):
        is_eos = i % positions == positions - 1
        ids = torch.randperm(V - 1, generator=g)[: int(sizes[i])]
        if is_eos:
            ids[0] = EOS
        valid_ids[i, : len(ids)] = ids.sort().values
        labels[i] = EOS if is_eos else ids[torch.randint(len(ids), (1,), generator=g)]
    seq_index = torch.arange(num_seqs).repeat_interleave(positions)
    first = torch.zeros(n, dtype=torch.bool)
    first[::positions] = True
    return ResponseBatch(hidden=hidden.to(dtype), labels=labels, weight=weight.to(dtype), seq_index=seq_index,
                         first=first, num_sequences=num_seqs, valid_ids=valid_ids)


def dense_mask(valid_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    mask = torch.zeros(valid_ids.shape[0], vocab + 1, dtype=torch.bool)
    mask.scatter_(1, torch.where(valid_ids >= 0, valid_ids, vocab), True)
    return mask[:, :vocab]


def dense_msl(hidden, weight, labels, valid_ids, tau=1.0, alpha_mode=False):
    """Eq. 9 the paper-code way: full logits, dense mask, -inf fill, log_softmax.

    ``alpha_mode`` (Table 6 "MSL + alpha"): the valid tokens other than the target get
    ``+ log(alpha)``, ``alpha = V / |valid|``, i.e. their exp terms are multiplied by alpha; invalid
    tokens stay at -inf (out of the denominator).
    """
    logits = hidden @ weight.T / tau
    mask = dense_mask(valid_ids, weight.shape[0])
    scores = logits.masked_fill(~mask, float("-inf"))
    if alpha_mode:
        alpha = weight.shape[0] / mask.sum(1).to(logits.dtype)
        negative = mask.clone()
        negative[torch.arange(len(labels)), labels] = False
        scores = scores + negative * torch.log(alpha).unsqueeze(1)
    logp = torch.log_softmax(scores, dim=1)
    nll = -tau * logp.gather(1, labels.unsqueeze(1)).squeeze(1)
    keep = mask.sum(1) > 1
    return nll[keep].mean() if keep.any() else nll.sum() * 0


def dense_w(logits, labels, valid_ids=None, tau=1.0):
    """The paper's w at the positive token: 1 - softmax(logits / tau)[y], over the valid set when given."""
    scores = logits / tau
    if valid_ids is not None:
        scores = scores.masked_fill(~dense_mask(valid_ids, logits.shape[1]), float("-inf"))
    return 1 - torch.softmax(scores, dim=1).gather(1, labels.unsqueeze(1)).squeeze(1)


def value_and_grads(fn, hidden, weight):
    """``fn(hidden, weight)`` and its gradients to both."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    out = fn(h, w)
    gh, gw = torch.autograd.grad(out, (h, w), allow_unused=True)
    return out.detach(), gh, gw
