"""MSL: the masked softmax loss (softmax over the trie's valid next tokens), and MSL with ATS."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from msl_rec.losses.base import RecLoss, ResponseBatch, loss_choice, loss_flag, loss_setting
from msl_rec.losses.functional import (
    ats_positions,
    ats_root,
    msl_alpha_loss,
    msl_loss,
    positive_weight,
    union_logits,
)
from msl_rec.losses.lml import invalid_mass_metrics, mean_over, multi_choice


class MSLLoss(RecLoss):
    """Masked softmax loss (Eq. 9), scoring only the union of the batch's valid ids.

    Args:
        tau: softmax temperature, > 0; the loss is multiplied by it (Eq. 9).
        alpha_mode: Table 6's "MSL + alpha": the valid non-target terms of the denominator are
            weighted by ``alpha = |Z| / |Z_valid|``; invalid tokens stay out
            (:func:`~msl_rec.losses.functional.msl_alpha_loss`, from the same union logits).
        log_invalid_mass: also log ``invalid_mass``, the full softmax's mass outside the valid set
            (a diagnostic, not Fig. 5's w). It needs full-vocabulary logits at the response
            positions, computed without grad; response positions are few (~14 per sample), so this is
            cheap next to the backbone. Off keeps the loss head strictly O(N * U * d).

    Metrics: ``loss``, ``tau`` (the tau used), ``valid_size``, ``w_mean`` (the paper's w for MSL,
    Eq. 10 / Fig. 5: ``1 - P_valid(y)``, the softmax over the valid set at ``tau``, at the positive
    token, averaged over positions with more than one valid token) and, with ``log_invalid_mass``,
    ``invalid_mass`` over the same positions.
    """

    needs_valid_ids = True

    def __init__(self, tau: float = 1.0, alpha_mode: bool = False, log_invalid_mass: bool = True):
        super().__init__()
        self.tau = loss_setting("tau", tau, above=0)
        self.alpha_mode = loss_flag("alpha_mode", alpha_mode)
        self.log_invalid_mass = loss_flag("log_invalid_mass", log_invalid_mass)

    def forward(self, batch: ResponseBatch) -> tuple[torch.Tensor, dict[str, float]]:
        return self._masked_softmax(batch, self.tau)

    def _masked_softmax(self, batch: ResponseBatch, tau: float) -> tuple[torch.Tensor, dict[str, float]]:
        if batch.valid_ids is None:
            raise ValueError(f"{type(self).__name__} needs batch.valid_ids")
        logits, label_cols, valid_cols = union_logits(batch.hidden, batch.weight, batch.labels, batch.valid_ids)
        if self.alpha_mode:
            loss = msl_alpha_loss(logits, label_cols, valid_cols, batch.weight.shape[0], tau)
        else:
            loss = msl_loss(logits, label_cols, valid_cols, tau)
        w = positive_weight(logits.detach(), label_cols, valid_cols, tau)
        metrics = {"loss": loss.item(), "tau": float(tau), "w_mean": mean_over(w, multi_choice(batch.valid_ids))}
        if self.log_invalid_mass:
            with torch.no_grad():
                full = batch.hidden.detach() @ batch.weight.detach().T
            metrics.update(invalid_mass_metrics(full, batch.valid_ids, tau))
        else:
            metrics["valid_size"] = (batch.valid_ids >= 0).sum(1).float().mean().item()
        return loss, metrics


class MSLATSLoss(MSLLoss):
    """MSL with Adaptive Temperature Strategy (ATS, Eq. 12), as in the released code.

    Statistics, from one response position per sample (``stats_at``): f = mean target logit,
    mu / sigma^2 = mean / unbiased variance of all valid-token logits there, m = mean valid-set size
    there, ``C = log(m * eta)``. ``stats_at="root"``: each sample's first response position (the
    trie root, as released); ``"widest"``: each sample's position with the largest valid set (for
    tokenizers whose root offers only a handful of tokens, e.g. SmolLM2's lone ``"``).

    Once per OPTIMIZER step (:meth:`on_optimizer_step`): the statistics of every micro-batch of
    the step, summed as float64 (count, sum, sum of squares), are all-reduced over ranks once, and
    ``tau_raw`` (the ``root`` of Eq. 12; ``"plus"``: released code, ``"minus"``: the paper's printed
    formula) is clamped to ``[tau_min, tau_max]`` and smoothed:
    ``tau_t = (1 - ema) * tau_{t-1} + ema * clamp(tau_raw)``, the EMA starting from ``ema_init``
    (1.5, as released; ``None``: from the first clamped root). So one step over 4 micro-batches
    gives the same tau as one step over their concatenation.

    Lag rule: every micro-batch of optimizer step t is trained with the tau from the end of step
    t-1 (``ema_init`` on the first step; ``warmup_tau`` while the EMA has no value yet). The
    released code (accumulation 1) folds step t's own statistics in before its loss, so its tau at
    step t is ours at step t+1: a lag of one step, ``ema * (clamp(tau_raw) - tau)`` at most.
    During the first ``warmup_steps`` optimizer steps tau is ``warmup_tau`` and the EMA is held.
    In eval mode nothing is accumulated. The EMA and the step count are buffers (saved in
    checkpoints); the pending sums are not (checkpoints are written between steps).

    Settings, checked at construction (errors name the ``loss.`` key): ``tau_min``, ``tau_max``,
    ``warmup_tau``, ``eta`` and ``ema_init`` (or None) > 0, ``tau_min <= tau_max``, ``ema`` in (0, 1],
    ``warmup_steps`` a whole number >= 0.

    Metrics: those of :class:`MSLLoss` per micro-batch (``tau`` is the tau used); per optimizer
    step, from :meth:`on_optimizer_step`: ``tau_raw`` and ``ats_m`` (the m it used).
    """

    def __init__(self, eta: float = 0.25, root: str = "plus", tau_min: float = 1.5, tau_max: float = 5.0,
                 ema: float = 0.05, ema_init: float | None = 1.5, stats_at: str = "root",
                 warmup_steps: int = 0, warmup_tau: float = 1.5, alpha_mode: bool = False,
                 log_invalid_mass: bool = True):
        # checked before MSLLoss's own checks, which would name warmup_tau loss.tau
        warmup_tau = loss_setting("warmup_tau", warmup_tau, above=0)
        super().__init__(tau=warmup_tau, alpha_mode=alpha_mode, log_invalid_mass=log_invalid_mass)
        self.root = loss_choice("root", root, ("plus", "minus"))
        self.stats_at = loss_choice("stats_at", stats_at, ("root", "widest"))
        self.eta = loss_setting("eta", eta, above=0)  # C = log(m * eta) needs m * eta > 0
        self.ema = loss_setting("ema", ema, above=0, at_most=1)
        self.tau_min = loss_setting("tau_min", tau_min, above=0)
        self.tau_max = loss_setting("tau_max", tau_max, above=0)
        if self.tau_min > self.tau_max:
            raise ValueError(f"loss.tau_min={tau_min} > loss.tau_max={tau_max}: the clamp range is empty")
        self.warmup_steps = loss_setting("warmup_steps", warmup_steps, at_least=0, integer=True)
        self.warmup_tau = warmup_tau
        init = float("nan") if ema_init is None else loss_setting("ema_init", ema_init, above=0)
        self.register_buffer("tau_ema", torch.tensor(init, dtype=torch.float64))
        self.register_buffer("step", torch.tensor(0, dtype=torch.int64))  # optimizer steps done
        # this step's sums so far: [n_valid, sum_valid, sumsq_valid, n_pos, sum_pos, sum_valid_size]
        self.register_buffer("pending", torch.zeros(6, dtype=torch.float64), persistent=False)

    @property
    def current_tau(self) -> float:
        """The tau every micro-batch of the current optimizer step trains with."""
        prev = float(self.tau_ema)
        if int(self.step) < self.warmup_steps or math.isnan(prev):
            return self.warmup_tau
        return prev

    @torch.no_grad()
    def statistics(self, batch: ResponseBatch) -> torch.Tensor:
        """float64 ``[n_valid, sum_valid, sumsq_valid, n_pos, sum_pos, sum_valid_size]`` of this rank's
        ``batch`` at the ``stats_at`` positions (no communication)."""
        at = ats_positions(batch.first, batch.valid_ids, batch.seq_index, batch.num_sequences, self.stats_at)
        logits, label_cols, valid_cols = union_logits(batch.hidden.detach()[at], batch.weight.detach(),
                                                      batch.labels[at], batch.valid_ids[at])
        logits = logits.double()
        valid = valid_cols >= 0
        f_valid = logits.gather(1, valid_cols.clamp_min(0))[valid]
        f_pos = logits.gather(1, label_cols.unsqueeze(1)).squeeze(1)
        one = torch.ones((), dtype=torch.float64, device=logits.device)
        return torch.stack([one * f_valid.numel(), f_valid.sum(), (f_valid * f_valid).sum(),
                            one * f_pos.numel(), f_pos.sum(), valid.sum().double()])

    def raw_temperature(self, stats: torch.Tensor) -> float:
        """Eq. 12's root from summed :meth:`statistics`; NaN if there are too few valid logits."""
        n_v, s_v, ss_v, n_p, s_p, s_m = stats.tolist()
        if n_v < 2 or n_p < 1:
            return float("nan")
        mu = s_v / n_v
        var = max(ss_v - s_v * mu, 0.0) / (n_v - 1)
        return float(ats_root(torch.tensor(s_p / n_p - mu), torch.tensor(var), s_m / n_p, self.eta, self.root))

    def forward(self, batch: ResponseBatch) -> tuple[torch.Tensor, dict[str, float]]:
        if batch.valid_ids is None:
            raise ValueError("MSLATSLoss needs batch.valid_ids")
        if self.training:
            self.pending += self.statistics(batch).to(self.pending.device)
        return self._masked_softmax(batch, self.current_tau)

    @torch.no_grad()
    def on_optimizer_step(self) -> dict[str, float]:
        """All-reduce this step's sums once, move the EMA once; returns ``tau_raw`` and ``ats_m``."""
        stats = self.pending.clone()
        self.pending.zero_()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        tau_raw = self.raw_temperature(stats)
        if int(self.step) >= self.warmup_steps and not math.isnan(tau_raw):
            new = min(max(tau_raw, self.tau_min), self.tau_max)
            prev = float(self.tau_ema)
            self.tau_ema.fill_(new if math.isnan(prev) else (1 - self.ema) * prev + self.ema * new)
        self.step += 1
        n_pos = float(stats[3])
        return {"tau_raw": tau_raw, "ats_m": float(stats[5]) / n_pos if n_pos else float("nan")}
