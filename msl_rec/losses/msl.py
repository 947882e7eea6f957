"""MSL: the masked softmax loss (softmax over the trie's valid next tokens), and MSL with ATS."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from msl_rec.losses.base import RecLoss, ResponseBatch
from msl_rec.losses.functional import ats_root, msl_alpha_loss, msl_loss, union_logits
from msl_rec.losses.lml import valid_metrics


class MSLLoss(RecLoss):
    """Masked softmax loss (Eq. 9), scoring only the union of the batch's valid ids.

    Args:
        tau: softmax temperature; the loss is multiplied by it (Eq. 9).
        alpha_mode: Table 6's "MSL + alpha" ablation: invalid tokens stay in the denominator,
            weighted by ``alpha = V / |valid set|`` (:func:`~msl_rec.losses.functional.msl_alpha_loss`).
            Needs full-vocabulary logits at the response positions.
        log_w: also log ``w_mean`` (see :class:`~msl_rec.losses.lml.LMLLoss`), which needs the
            full-vocabulary logits at the response positions, computed without grad. Response
            positions are few (~14 per sample), so this is cheap next to the backbone; turn it off
            to keep the loss head strictly O(N * U * d).

    Metrics: ``loss``, ``tau``, ``valid_size`` and, with ``log_w``, ``w_mean``.
    """

    needs_valid_ids = True

    def __init__(self, tau: float = 1.0, alpha_mode: bool = False, log_w: bool = True):
        super().__init__()
        self.tau = float(tau)
        self.alpha_mode = bool(alpha_mode)
        self.log_w = bool(log_w)

    def forward(self, batch: ResponseBatch) -> tuple[torch.Tensor, dict[str, float]]:
        return self._masked_softmax(batch, self.tau)

    def _masked_softmax(self, batch: ResponseBatch, tau: float) -> tuple[torch.Tensor, dict[str, float]]:
        if batch.valid_ids is None:
            raise ValueError(f"{type(self).__name__} needs batch.valid_ids")
        full = None
        if self.alpha_mode:
            full = batch.hidden @ batch.weight.T
            loss = msl_alpha_loss(full, batch.labels, batch.valid_ids, tau)
        else:
            logits, label_cols, valid_cols = union_logits(batch.hidden, batch.weight, batch.labels,
                                                          batch.valid_ids)
            loss = msl_loss(logits, label_cols, valid_cols, tau)
        metrics = {"loss": loss.item(), "tau": float(tau)}
        if self.log_w:
            if full is None:
                with torch.no_grad():
                    full = batch.hidden.detach() @ batch.weight.detach().T
            metrics.update(valid_metrics(full, batch.valid_ids, tau))
        else:
            metrics["valid_size"] = (batch.valid_ids >= 0).sum(1).float().mean().item()
        return loss, metrics


class MSLATSLoss(MSLLoss):
    """MSL with Adaptive Temperature Strategy (ATS, Eq. 12), as in the released code.

    Every step, from the FIRST response position of every sample (``batch.first``, the trie root):
    f = mean target logit, mu / sigma^2 = mean / unbiased variance of all valid-token logits there,
    m = mean valid-set size there. ``tau_raw`` is the ``root`` of Eq. 12 (``"plus"``: released code;
    ``"minus"``: the paper's printed formula), clamped to ``[tau_min, tau_max]`` and smoothed:
    ``tau_t = (1 - ema) * tau_{t-1} + ema * tau_new`` (``tau_new`` itself on the first step).
    For the first ``warmup_steps`` training steps ``warmup_tau`` is used and the EMA is not started.

    Under ``torch.distributed`` the statistics are summed over ranks (float64 count / sum / sum of
    squares), so every rank computes the same tau. A "step" is a forward call in training mode
    (with gradient accumulation that is one micro-batch). In eval mode nothing is updated and the
    current tau is used. The EMA state lives in buffers, so it is saved in checkpoints.

    Metrics: those of :class:`MSLLoss` (``tau`` is the tau used) plus ``tau_raw``.
    """

    def __init__(self, eta: float = 0.25, root: str = "plus", tau_min: float = 1.5, tau_max: float = 5.0,
                 ema: float = 0.05, warmup_steps: int = 0, warmup_tau: float = 1.0,
                 alpha_mode: bool = False, log_w: bool = True):
        super().__init__(tau=warmup_tau, alpha_mode=alpha_mode, log_w=log_w)
        if root not in ("plus", "minus"):
            raise ValueError(f"root must be 'plus' or 'minus', got {root!r}")
        if not 0 < ema <= 1:
            raise ValueError(f"ema must be in (0, 1], got {ema}")
        if tau_min > tau_max:
            raise ValueError(f"tau_min={tau_min} > tau_max={tau_max}")
        self.eta, self.root = float(eta), root
        self.tau_min, self.tau_max = float(tau_min), float(tau_max)
        self.ema, self.warmup_steps, self.warmup_tau = float(ema), int(warmup_steps), float(warmup_tau)
        self.register_buffer("tau_ema", torch.tensor(float("nan"), dtype=torch.float64))
        self.register_buffer("step", torch.tensor(0, dtype=torch.int64))

    @torch.no_grad()
    def root_statistics(self, batch: ResponseBatch) -> torch.Tensor:
        """float64 ``[n_valid, sum_valid, sumsq_valid, n_first, sum_pos, sum_fanout]``, summed over ranks."""
        first = batch.first
        valid_ids = batch.valid_ids[first]
        logits, label_cols, valid_cols = union_logits(batch.hidden.detach()[first], batch.weight.detach(),
                                                      batch.labels[first], valid_ids)
        logits = logits.double()
        valid = valid_cols >= 0
        f_valid = logits.gather(1, valid_cols.clamp_min(0))[valid]
        f_pos = logits.gather(1, label_cols.unsqueeze(1)).squeeze(1)
        stats = torch.stack([
            torch.tensor(float(f_valid.numel()), dtype=torch.float64, device=logits.device),
            f_valid.sum(), (f_valid * f_valid).sum(),
            torch.tensor(float(f_pos.numel()), dtype=torch.float64, device=logits.device),
            f_pos.sum(), valid.sum().double(),
        ])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        return stats

    def raw_temperature(self, stats: torch.Tensor) -> float:
        """Eq. 12's root from :meth:`root_statistics`; NaN if there are too few valid logits."""
        n_v, s_v, ss_v, n_p, s_p, s_m = stats.tolist()
        if n_v < 2 or n_p < 1:
            return float("nan")
        mu = s_v / n_v
        var = max(ss_v - s_v * mu, 0.0) / (n_v - 1)
        return float(ats_root(torch.tensor(s_p / n_p - mu), torch.tensor(var), s_m / n_p, self.eta, self.root))

    def forward(self, batch: ResponseBatch) -> tuple[torch.Tensor, dict[str, float]]:
        if batch.valid_ids is None:
            raise ValueError("MSLATSLoss needs batch.valid_ids")
        tau_raw = self.raw_temperature(self.root_statistics(batch))
        tau_new = min(max(tau_raw, self.tau_min), self.tau_max) if not math.isnan(tau_raw) else None
        prev = float(self.tau_ema)
        in_warmup = int(self.step) < self.warmup_steps
        if in_warmup:
            tau = self.warmup_tau
        elif tau_new is None:  # no usable statistics this step: keep the current tau
            tau = self.warmup_tau if math.isnan(prev) else prev
        else:
            tau = tau_new if math.isnan(prev) else (1 - self.ema) * prev + self.ema * tau_new
        if self.training:
            if not in_warmup and tau_new is not None:
                self.tau_ema.fill_(tau)
            self.step += 1
        elif not in_warmup and not math.isnan(prev):
            tau = prev  # eval: use the tau training has reached, change nothing
        loss, metrics = self._masked_softmax(batch, tau)
        metrics["tau_raw"] = tau_raw
        return loss, metrics
