"""The LightningModule: a LoRA-adapted causal LM trained with a pluggable recommendation loss.

Built from plain data only (backbone, loss and decoder config dicts, optimiser settings), so
``save_hyperparameters`` captures everything and ``load_from_checkpoint`` rebuilds the same network:
the loss in ``__init__`` (cheap), the backbone in ``configure_model`` (idempotent; Lightning calls
it from ``fit``/``validate`` and from ``load_from_checkpoint``).

Checkpoints hold only the trainable LoRA weights and the loss's buffers (e.g. MSL-ATS's EMA of
tau) besides the trainer state; they load with ``strict=False`` semantics (``strict_loading``).

Per step the backbone runs to its final hidden states (after the last norm) and no lm_head is
applied: only the positions that predict a response token go to the loss (:class:`ResponseBatch`).

Learning-rate schedule: linear warm-up over ``warmup_steps`` optimiser steps, then ``schedule``:
``linear`` decay to 0 at the last step (the HF Trainer default BIGRec/MSL use) or ``constant``.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch

from msl_rec.losses.base import ResponseBatch
from msl_rec.models.backbone import (
    backbone_body,
    build_backbone,
    output_weight,
    position_ids_from_mask,
)

log = logging.getLogger(__name__)

# plain keys a loss config may carry for its recipe (S-DPO), not loss arguments
RECIPE_KEYS = ("sft_ckpt", "lr", "epochs", "fixed_negatives")


def _plain(cfg: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def build_loss(loss_cfg: Mapping[str, Any]):
    """Instantiate a loss from its config (``_target_`` + arguments); recipe keys the loss's
    ``__init__`` does not accept are dropped."""
    from hydra.utils import get_class

    cfg = dict(loss_cfg)
    cls = get_class(cfg.pop("_target_"))
    params = inspect.signature(cls.__init__).parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key in RECIPE_KEYS:
        if key in cfg and key not in params and not takes_kwargs:
            cfg.pop(key)
    return cls(**cfg)


def load_adapter_state(ckpt_path: str | Path) -> dict[str, torch.Tensor]:
    """The LoRA weights of a RecLitModule checkpoint, with peft key names (``base_model....``)."""
    state = torch.load(str(ckpt_path), map_location="cpu", weights_only=False)["state_dict"]
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.") and "lora_" in k}


def _decoding():
    """(build_decoder, evaluate) or None when the decoding package is not there."""
    try:
        from msl_rec.decoding import build_decoder
        from msl_rec.decoding.evaluate import evaluate
    except ImportError:
        return None
    return build_decoder, evaluate


def _np_state(state) -> list:
    """numpy's RNG state with plain types (checkpoints load with torch.load(weights_only=True))."""
    kind, keys, *rest = state
    return [kind, torch.from_numpy(keys.astype("int64")), *[r.item() if hasattr(r, "item") else r for r in rest]]


class RecLitModule(L.LightningModule):
    def __init__(
        self,
        backbone: Mapping[str, Any],
        loss: Mapping[str, Any],
        optim: Mapping[str, Any] | None = None,
        decoder: Mapping[str, Any] | None = None,
        top_k: tuple[int, ...] | list[int] = (1, 5, 10),
    ):
        """
        Args:
            backbone: a ``configs/backbone`` node (name, source, lora, arch, tokenizer, ...).
            loss: a ``configs/loss`` node (``_target_`` + arguments; S-DPO may add ``sft_ckpt``).
            optim: ``lr`` (1e-4), ``weight_decay`` (0), ``warmup_steps`` (20), ``schedule``
                (linear|constant), ``betas``.
            decoder: a ``configs/decoder`` node used for validation (NDCG/HR); None: validate by loss.
            top_k: cut-offs for the validation metrics.
        """
        super().__init__()
        self.save_hyperparameters({"backbone": _plain(backbone), "loss": _plain(loss),
                                   "optim": _plain(optim) or {}, "decoder": _plain(decoder),
                                   "top_k": list(top_k)})
        self.loss = build_loss(self.hparams.loss)
        self.model = None  # built in configure_model
        self.decoder = None
        self.strict_loading = False  # checkpoints hold the adapter and loss buffers only
        self._t_last: float | None = None

    # ------------------------------------------------------------------ building
    def configure_model(self) -> None:
        if self.model is not None:
            return
        sft = (self.hparams.loss or {}).get("sft_ckpt")
        merge = load_adapter_state(sft) if sft else None
        self.model = build_backbone(self.hparams.backbone, merge_adapter=merge)
        if sft:
            log.info("merged the SFT adapter of %s into the base model (reference = adapter disabled)", sft)

    def _build_decoder(self):
        if self.decoder is not None or not self.hparams.decoder:
            return self.decoder
        dec = _decoding()
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dec is None or dm is None or getattr(dm, "catalog", None) is None:
            return None
        build_decoder, _ = dec
        self.decoder = build_decoder(self.hparams.decoder, dm.catalog,
                                     train_targets=getattr(dm, "train_targets", None))
        return self.decoder

    # ------------------------------------------------------------------ checkpoints
    def _kept_keys(self) -> set[str]:
        keep = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        keep |= {f"loss.{n}" for n, _ in self.loss.named_parameters()}
        keep |= {f"loss.{n}" for n, _ in self.loss.named_buffers()}
        return keep

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self._kept_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        # RNG states (LoRA dropout, negatives): a resumed run draws what the uninterrupted run draws
        import random

        import numpy as np

        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "numpy": _np_state(np.random.get_state()),
                                    "python": random.getstate(),
                                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        # restored here, after model building and setup consumed random numbers
        rng = getattr(self, "_rng_to_restore", None)
        if rng:
            import random

            import numpy as np

            torch.set_rng_state(rng["torch"])
            kind, keys, *rest = rng["numpy"]
            np.random.set_state((kind, np.asarray(keys).astype(np.uint32), *rest))
            random.setstate(rng["python"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            self._rng_to_restore = None

    # ------------------------------------------------------------------ forward
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, d) final hidden states (after the last norm); no lm_head."""
        body = backbone_body(self.model)
        out = body(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        return out.last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, V) logits at every position (for evaluation and tests, not for training)."""
        h = self.hidden_states(input_ids, attention_mask)
        return h @ output_weight(self.model).t()

    @staticmethod
    def _response_rows(labels: torch.Tensor):
        """Row selection for positions predicting a response token.

        Returns (mask over positions 0..T-2, labels (N,), seq_index (N,), first (N,)).
        """
        target = labels[:, 1:]
        mask = target != -100
        seq_index = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(mask)[mask]
        first = (mask & (mask.long().cumsum(-1) == 1))[mask]
        return mask, target[mask], seq_index, first

    def _merge_negatives(self, batch: Mapping[str, torch.Tensor]):
        """Positives then negatives ((b, j) order) in one left-padded batch."""
        ids, am, lab = batch["input_ids"], batch["attention_mask"], batch["labels"]
        nids, nam, nlab = batch["neg_input_ids"], batch["neg_attention_mask"], batch["neg_labels"]
        T = max(ids.shape[1], nids.shape[1])
        pad_id = int(ids[am == 0][0]) if bool((am == 0).any()) else 0

        def left_pad(x, value):
            return torch.nn.functional.pad(x, (T - x.shape[1], 0), value=value)

        return (torch.cat([left_pad(ids, pad_id), left_pad(nids, pad_id)]),
                torch.cat([left_pad(am, 0), left_pad(nam, 0)]),
                torch.cat([left_pad(lab, -100), left_pad(nlab, -100)]))

    def response_batch(self, batch: Mapping[str, torch.Tensor]) -> ResponseBatch:
        """Forward the backbone and gather the rows the loss scores (plus reference log-probs)."""
        with_negatives = self.loss.needs_reference or int(getattr(self.loss, "num_negatives", 0)) > 0
        if with_negatives and "neg_input_ids" in batch:
            input_ids, attention_mask, labels = self._merge_negatives(batch)
        else:
            input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        mask, tgt, seq_index, first = self._response_rows(labels)
        hidden = self.hidden_states(input_ids, attention_mask)[:, :-1][mask]
        weight = output_weight(self.model)
        S = input_ids.shape[0]

        valid_ids = None
        # valid sets are cheap (a sparse id list per position), so every loss gets them when the
        # batch has them: MSL needs them, LML uses them only to log w = 1 - P_valid (Fig. 5)
        if "valid_ids" in batch and S == batch["input_ids"].shape[0]:
            v = batch["valid_ids"]
            rl = batch["response_len"].to(v.device)
            keep = torch.arange(v.shape[1], device=v.device)[None, :] < rl[:, None]
            valid_ids = v[keep]
            if valid_ids.shape[0] != tgt.shape[0]:
                raise ValueError(f"valid_ids rows ({valid_ids.shape[0]}) != response positions "
                                 f"({tgt.shape[0]}): response_len and labels disagree")

        ref_logps = None
        if self.loss.needs_reference:
            from msl_rec.losses.functional import sequence_logps

            with torch.no_grad(), self.model.disable_adapter():
                ref_h = self.hidden_states(input_ids, attention_mask)[:, :-1][mask]
                ref_logps = sequence_logps(ref_h, weight, tgt, seq_index, S).detach()

        return ResponseBatch(hidden=hidden, labels=tgt, weight=weight, seq_index=seq_index, first=first,
                             num_sequences=S, valid_ids=valid_ids, ref_logps=ref_logps)

    @torch.no_grad()
    def valid_weights(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The paper's w (Eq. 7 / 10, Fig. 5) at every response position of ``batch``, tau 1, float32.

        Returns (N,) tensors: ``w_lml`` = 1 - P(y) under the full softmax, ``w_msl`` = 1 - P_valid(y)
        under the softmax over the position's valid set (0 where it holds one token), ``num_valid``
        = the valid-set size. Full-vocabulary logits are formed for the response positions only.
        """
        from msl_rec.losses.functional import positive_weight

        rb = self.response_batch({k: v for k, v in batch.items() if not k.startswith("neg_")})
        logits = rb.hidden @ rb.weight.t()
        return {"w_lml": positive_weight(logits, rb.labels), "w_msl": positive_weight(logits, rb.labels, rb.valid_ids),
                "num_valid": (rb.valid_ids >= 0).sum(1)}

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        rb = self.response_batch(batch)
        loss, metrics = self.loss(rb)
        bs = int(batch["input_ids"].shape[0])
        now = time.perf_counter()
        tokens = float(batch["attention_mask"].sum())
        if "neg_attention_mask" in batch:
            tokens += float(batch["neg_attention_mask"].sum())
        if self._t_last is not None and now > self._t_last:
            self.log("train/tokens_per_s", tokens / (now - self._t_last), on_step=True, on_epoch=False,
                     batch_size=bs)
        self._t_last = now
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        for k, v in (metrics or {}).items():
            if k == "loss":  # logged above
                continue
            self.log(f"train/{k}", float(v), on_step=True, on_epoch=False, batch_size=bs)
        if self.trainer is not None and self.trainer.optimizers:
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            self.log("train/lr", lr, on_step=True, on_epoch=False, batch_size=bs)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # once per optimizer step, whatever the gradient accumulation: per-step loss state (ATS)
        for k, v in self.loss.on_optimizer_step().items():
            self.log(f"train/{k}", float(v), on_step=True, on_epoch=False)

    def on_train_epoch_start(self) -> None:
        self._t_last = None
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "set_epoch"):
            dm.set_epoch(self.current_epoch)

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        bs = int(batch["input_ids"].shape[0]) if "input_ids" in batch else int(batch["target_ids"].shape[0])
        decoder = self._build_decoder()
        if decoder is None:
            rb = self.response_batch(batch)
            loss, _ = self.loss(rb)
            self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=bs)
            return
        _, evaluate = _decoding()
        dm = self.trainer.datamodule
        result = evaluate(decoder, self.model, [batch], dm.catalog, top_k=tuple(self.hparams.top_k))
        for k, v in result.metrics.items():
            # per-sample means, weighted by batch size across batches and ranks
            self.log(f"val/{k}", float(v), on_epoch=True, sync_dist=True, batch_size=bs,
                     prog_bar=k.endswith("@10"))

    def on_train_end(self) -> None:
        # each rank writes its loss state, so a DDP run can be checked for desync (tests do)
        if self.trainer.world_size > 1:
            out = Path(self.trainer.default_root_dir) / "rank_state"
            out.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().float().cpu().tolist() for k, v in self.loss.state_dict().items()}
            (out / f"rank{self.global_rank}.json").write_text(json.dumps(state))

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        o = dict(self.hparams.optim or {})
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=float(o.get("lr", 1e-4)),
                                weight_decay=float(o.get("weight_decay", 0.0)),
                                betas=tuple(o.get("betas", (0.9, 0.999))))
        warmup = int(o.get("warmup_steps", 20))
        schedule = o.get("schedule", "linear")
        if schedule not in ("linear", "constant"):
            raise ValueError(f"optim.schedule: {schedule!r} (linear, constant)")
        total = None
        if schedule == "linear":
            try:
                total = int(self.trainer.estimated_stepping_batches)
            except (RuntimeError, OverflowError):  # no trainer attached (plain use), or an infinite loader
                total = None

        def factor(step: int) -> float:
            if warmup > 0 and step < warmup:
                return (step + 1) / warmup
            if total is None or total <= warmup or schedule == "constant":
                return 1.0
            return max(0.0, (total - step) / (total - warmup))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
