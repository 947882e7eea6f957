"""Pure-torch loss functions; the modules in this package are thin wrappers around these.

Shapes: N response positions, V vocabulary, d hidden size, K widest valid set (padded with -1),
U distinct valid ids in a batch, S sequences, B samples, n negatives per sample.
All log-sum-exps and probabilities are computed in float32 or wider, whatever the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "ats_positions",
    "ats_root",
    "ats_temperature",
    "lml_loss",
    "masked_logsumexp",
    "msl_alpha_loss",
    "msl_loss",
    "msl_loss_from_hidden",
    "positive_weight",
    "sdpo_loss",
    "sequence_logps",
    "token_logps",
    "union_logits",
    "valid_probability",
]


def _masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``keep``; 0 (still attached to the graph) when nothing is kept."""
    kept = torch.where(keep, values, torch.zeros_like(values))
    return kept.sum() / keep.sum().clamp_min(1)


def lml_loss(logits: torch.Tensor, labels: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Language-modelling loss at response positions: mean of ``-log softmax(logits / tau)[label]``.

    Args:
        logits: (N, V) logits of the response positions only (never the prompt's).
        labels: (N,) the token each position predicts.
    """
    return F.cross_entropy(logits.float() / tau, labels)


def msl_loss(logits: torch.Tensor, labels: torch.Tensor, valid_ids: torch.Tensor,
             tau: float = 1.0) -> torch.Tensor:
    """Masked softmax loss (Eq. 9): the softmax runs over the valid next tokens only.

    ``tau * -log(exp(f_y / tau) / sum_{z valid} exp(f_z / tau))``, averaged over the positions whose
    valid set has more than one token (a single-choice position has loss 0 and carries no signal,
    so it is left out of the mean; if no position qualifies the result is 0, still with a graph).

    Args:
        logits: (N, C) scores; ``valid_ids`` and ``labels`` index its columns (C = V, or U for the
            union logits of :func:`msl_loss_from_hidden`).
        labels: (N,) target column; must be one of the row's valid ids.
        valid_ids: (N, K) valid columns per row, padded with -1.
        tau: temperature (a float or a 0-d tensor).
    """
    nll = -tau * token_logps(logits.float() / tau, labels, valid_ids)
    return _masked_mean(nll, (valid_ids >= 0).sum(1) > 1)


def masked_logsumexp(logits: torch.Tensor, valid_cols: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) float32 ``logsumexp`` of each row of ``logits`` (N, C) over its valid columns ``valid_cols``
    (N, K), -1 padded; over every column when ``valid_cols`` is None (-inf entries count as absent).
    The one masked log-softmax normaliser: losses, scoring and beam search all use it."""
    logits = logits.float()
    if valid_cols is None:
        return torch.logsumexp(logits, dim=-1)
    valid = valid_cols >= 0
    return torch.logsumexp(logits.gather(1, valid_cols.clamp_min(0)).masked_fill(~valid, float("-inf")), dim=-1)


def token_logps(logits: torch.Tensor, labels: torch.Tensor, valid_cols: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) float32 ``log softmax(logits)[label]``, the softmax over each row's valid columns
    (``valid_cols`` (N, K), -1 padded; the label must be one of them) or the whole row (None)."""
    logits = logits.float()
    return logits.gather(1, labels.unsqueeze(1)).squeeze(1) - masked_logsumexp(logits, valid_cols)


def union_logits(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                 valid_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of the batch's distinct valid ids only, and ``labels`` / ``valid_ids`` as their columns.

    Returns:
        logits: (N, U) ``hidden @ weight[union].T`` with ``union = unique(valid_ids >= 0)`` (sorted).
        label_cols: (N,) column of each label in ``logits``.
        valid_cols: (N, K) column of each valid id, -1 at pads.
    """
    valid = valid_ids >= 0
    union = torch.unique(valid_ids[valid])  # sorted ascending, so searchsorted maps id -> column
    logits = hidden @ weight[union].T
    top = max(len(union) - 1, 0)
    valid_cols = torch.searchsorted(union, valid_ids.clamp_min(0)).clamp_max(top)
    valid_cols = torch.where(valid, valid_cols, torch.full_like(valid_cols, -1))
    label_cols = torch.searchsorted(union, labels).clamp_max(top)
    return logits, label_cols, valid_cols


def msl_loss_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         valid_ids: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """:func:`msl_loss` from hidden states, scoring only the union of the batch's valid ids.

    Equal to ``msl_loss(hidden @ weight.T, labels, valid_ids, tau)`` without forming full-vocabulary
    logits or an (N, K, d) tensor: cost is O(N * U * d) with U the number of distinct valid ids.

    Args:
        hidden: (N, d) final hidden states at the response positions.
        weight: (V, d) output embedding; gradients reach it if it requires grad.
        labels: (N,) target token ids (each among its row's valid ids).
        valid_ids: (N, K) valid token ids, padded with -1.
    """
    logits, label_cols, valid_cols = union_logits(hidden, weight, labels, valid_ids)
    return msl_loss(logits, label_cols, valid_cols, tau)


def msl_alpha_loss(logits: torch.Tensor, labels: torch.Tensor, valid_ids: torch.Tensor, vocab_size: int,
                   tau: float = 1.0) -> torch.Tensor:
    """Table 6's "MSL + alpha": MSL with the valid NON-target terms of the denominator weighted by alpha.

    Per position ``alpha = |Z| / |Z_valid|`` (vocabulary size over valid-set size) and the loss is
    ``tau * -log(exp(f_y/tau) / (exp(f_y/tau) + alpha * sum_{z valid, z != y} exp(f_z/tau)))``.
    Invalid tokens stay out, as in :func:`msl_loss`; positions with a single valid token are left out
    of the mean the same way. The weighting is ``+ log(alpha)`` on the non-target valid logits inside
    one log-sum-exp (exact and stable), so union logits suffice: no full-vocabulary logits.

    Args:
        logits: (N, C) scores; ``valid_ids`` / ``labels`` index its columns (C = V, or the union
            logits of :func:`union_logits`).
        labels: (N,) target column, one of the row's valid columns.
        valid_ids: (N, K) valid columns per row, padded with -1.
        vocab_size: |Z|, the size of the whole vocabulary (not C).
    """
    logits = logits.float()
    valid = valid_ids >= 0
    sizes = valid.sum(1)
    log_alpha = math.log(vocab_size) - sizes.clamp_min(1).double().log().float()  # (N,)
    cols = valid_ids.clamp_min(0)
    f_valid = logits.gather(1, cols) / tau
    negative = valid & (cols != labels.unsqueeze(1))
    f_valid = torch.where(negative, f_valid + log_alpha.unsqueeze(1), f_valid).masked_fill(~valid, float("-inf"))
    f_pos = logits.gather(1, labels.unsqueeze(1)).squeeze(1) / tau
    nll = tau * (torch.logsumexp(f_valid, dim=1) - f_pos)
    return _masked_mean(nll, sizes > 1)


@torch.no_grad()
def positive_weight(logits: torch.Tensor, labels: torch.Tensor, valid_ids: torch.Tensor | None = None,
                    tau: float = 1.0) -> torch.Tensor:
    """(N,) the paper's w (Eq. 7 / 10, Fig. 5): ``1 - P(y)``, the weight of the positive token's gradient.

    ``valid_ids=None``: LML's w, ``P`` the full softmax of ``logits / tau`` (pass full-vocabulary
    logits). Otherwise MSL's w, ``P_valid`` the softmax over each row's valid columns only (full or
    union logits both work). MSL's w is never larger than LML's on the same logits (its denominator
    is a subset of the terms), which is the "vanishing gradient" the temperature counters.
    """
    p = token_logps(logits.float() / tau, labels, valid_ids).exp()
    return (1.0 - p).clamp_min(0.0)


@torch.no_grad()
def valid_probability(logits: torch.Tensor, valid_ids: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """(N,) probability mass the full softmax of ``logits / tau`` puts on each row's valid set.

    ``1 - valid_probability`` is the mass on tokens the trie can never emit (logged as
    ``invalid_mass``). It is NOT the paper's w of Fig. 5; that is :func:`positive_weight`.
    """
    logp = torch.log_softmax(logits.float() / tau, dim=1)
    valid = valid_ids >= 0
    lp_valid = logp.gather(1, valid_ids.clamp_min(0)).masked_fill(~valid, float("-inf"))
    return torch.logsumexp(lp_valid, dim=1).exp().clamp_max(1.0)


def ats_positions(first: torch.Tensor, valid_ids: torch.Tensor, seq_index: torch.Tensor, num_sequences: int,
                  stats_at: str = "root") -> torch.Tensor:
    """(N,) bool: the one response position per sequence that ATS takes its statistics from.

    ``"root"``: each sequence's first response position (the trie root, as the released code).
    ``"widest"``: each sequence's position with the largest valid set (the first such on ties).
    """
    if stats_at == "root":
        return first.clone()
    if stats_at != "widest":
        raise ValueError(f"stats_at must be 'root' or 'widest', got {stats_at!r}")
    sizes = (valid_ids >= 0).sum(1)
    widest = sizes.new_full((num_sequences,), -1).scatter_reduce(0, seq_index, sizes, reduce="amax")
    at_max = sizes == widest[seq_index]
    # first row of each sequence at its maximum: rows are in sequence order, so the earliest index wins
    rows = torch.arange(len(sizes), device=sizes.device)
    pick = rows.new_full((num_sequences,), len(sizes)).scatter_reduce(
        0, seq_index[at_max], rows[at_max], reduce="amin")
    out = torch.zeros_like(first)
    out[pick[pick < len(sizes)]] = True
    return out


def ats_root(gap: torch.Tensor, var: torch.Tensor, num_valid: torch.Tensor | float,
             eta: float = 0.25, root: str = "plus") -> torch.Tensor:
    """Root of ``C tau^2 - gap tau + var / 2 = 0`` with ``C = log(num_valid * eta)`` (Eq. 12).

    ``root="minus"``: ``(gap - sqrt(gap^2 - 2 C var)) / (2C)``, the formula printed in the paper.
    ``root="plus"``: ``(gap + sqrt(gap^2 - 2 C var)) / (2C)``, the root the released code uses
    (the larger one when C > 0). A negative discriminant is clamped to 0 (the double root
    ``gap / 2C``). If ``C == 0`` the equation is linear and its only root ``var / (2 gap)`` is returned.
    """
    if root not in ("plus", "minus"):
        raise ValueError(f"root must be 'plus' or 'minus', got {root!r}")
    gap = torch.as_tensor(gap, dtype=torch.float64)
    var = torch.as_tensor(var, dtype=torch.float64)
    c = torch.log(torch.as_tensor(num_valid, dtype=torch.float64) * eta)
    sqrt_disc = (gap * gap - 2 * c * var).clamp_min(0).sqrt()
    sign = 1.0 if root == "plus" else -1.0
    quadratic = (gap + sign * sqrt_disc) / (2 * c)
    return torch.where(c == 0, var / (2 * gap), quadratic)


def ats_temperature(pos_logits: torch.Tensor, valid_logits: torch.Tensor, num_valid: torch.Tensor | float,
                    eta: float = 0.25, root: str = "plus") -> torch.Tensor:
    """Adaptive temperature (Eq. 12) from the logits at the trie root, as a raw (unclamped) root.

    Args:
        pos_logits: logits of the target tokens (any shape); f = their mean.
        valid_logits: logits of the valid tokens (any shape); mu, sigma^2 = their mean and unbiased
            variance.
        num_valid: m, the average number of valid tokens (the root's fan-out).
        eta: the ratio in ``C = log(m * eta)``.
        root: ``"plus"`` (released code, default) or ``"minus"`` (paper's printed formula).
    Returns:
        0-d float64 tensor, the root of ``C tau^2 - (f - mu) tau + sigma^2 / 2 = 0``.
    """
    valid_logits = valid_logits.detach().double().flatten()
    gap = pos_logits.detach().double().mean() - valid_logits.mean()
    return ats_root(gap, valid_logits.var(), num_valid, eta, root)


def sdpo_loss(policy_pos_logps: torch.Tensor, policy_neg_logps: torch.Tensor, ref_pos_logps: torch.Tensor,
              ref_neg_logps: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Softmax DPO (S-DPO): ``mean_b -log sigmoid(-logsumexp_j beta * (r_neg_bj - r_pos_b))``.

    ``r = log pi - log pi_ref`` of a whole response. ``-log sigmoid(-z) = softplus(z)``, so the loss
    is finite for any reward gap.

    Args:
        policy_pos_logps, ref_pos_logps: (B,) log-probabilities of the target responses.
        policy_neg_logps, ref_neg_logps: (B, n) log-probabilities of the negatives.
    """
    pos_reward = policy_pos_logps - ref_pos_logps
    neg_reward = policy_neg_logps - ref_neg_logps
    z = torch.logsumexp(beta * (neg_reward - pos_reward.unsqueeze(1)), dim=1)
    return F.softplus(z).mean()


def sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, seq_index: torch.Tensor,
                   num_sequences: int, valid_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(S,) float32 log-probability of each response: ``sum log softmax(hidden @ weight.T)[label]`` over
    each sequence's response positions. The one sequence log-probability (S-DPO's policy and
    reference, the evaluation's ``target_logp`` and sampled rank).

    Args:
        hidden: (N, d) final hidden states of the positions predicting ``labels``.
        weight: (V, d) output embedding.
        labels: (N,) the response token each position predicts.
        seq_index: (N,) sequence of each position, in 0..S-1.
        valid_ids: (N, K) trie-valid token ids per position, -1 padded: the softmax runs over them
            only (the union of the batch's valid ids is scored, never the whole vocabulary); None:
            over the whole vocabulary.
    """
    if valid_ids is None:
        logps = token_logps(hidden @ weight.T, labels)
    else:
        valid = valid_ids >= 0
        if not bool((valid & (valid_ids == labels[:, None])).any(-1).all()):
            raise ValueError("a response token is not among its position's valid_ids: catalog and batch disagree")
        logits, label_cols, valid_cols = union_logits(hidden, weight, labels, valid_ids)
        logps = token_logps(logits, label_cols, valid_cols)
    out = torch.zeros(num_sequences, dtype=logps.dtype, device=logps.device)
    return out.index_add(0, seq_index, logps)
