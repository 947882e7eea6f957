"""The LightningModule: a LoRA-adapted causal LM trained with a pluggable recommendation loss.

Built from plain data only (backbone, loss and decoder config dicts, optimiser settings, an
optional SFT checkpoint), so ``save_hyperparameters`` captures everything and
``load_from_checkpoint`` rebuilds the same network: the loss in ``__init__`` (cheap), the backbone
in ``configure_model`` (idempotent; Lightning calls it from ``fit``/``validate`` and from
``load_from_checkpoint``).

Per step the backbone runs to its final hidden states (after the last norm) and no lm_head is
applied: only the positions that predict a response token go to the loss (:class:`ResponseBatch`).

Beside it: checkpoint contents (adapter only, canonical names, per-rank RNG) in
:mod:`msl_rec.models.checkpoint`, optimiser and lr schedule in :mod:`msl_rec.training.optim`,
throughput logging in :mod:`msl_rec.training.throughput`, S-DPO's negatives and reference pass in
:mod:`msl_rec.losses.sdpo`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from msl_rec.losses import build_loss
from msl_rec.losses.base import ResponseBatch
from msl_rec.losses.functional import positive_weight
from msl_rec.losses.sdpo import merge_negatives, reference_logps
from msl_rec.models import checkpoint as ckpt_state
from msl_rec.models.backbone import build_backbone
from msl_rec.models.fsdp_utils import DecodingCopy, is_fsdp
from msl_rec.models.hybrid import SlotEmbedding, find_slots, hybrid_step, install_slots
from msl_rec.models.inference import hidden_states, output_weight
from msl_rec.training import hybrid
from msl_rec.training.base import RankingModule
from msl_rec.training.optim import build_lr_schedule, build_optimizer
from msl_rec.training.throughput import TrainThroughput
from msl_rec.utils.config import plain
from msl_rec.utils.registry import check_targets

log = logging.getLogger(__name__)


class RecLitModule(RankingModule):
    def __init__(
        self,
        backbone: Mapping[str, Any],
        loss: Mapping[str, Any],
        optim: Mapping[str, Any] | None = None,
        decoder: Mapping[str, Any] | None = None,
        top_k: tuple[int, ...] | list[int] = (1, 5, 10),
        sft_ckpt: str | None = None,
        scoring: Mapping[str, Any] | None = None,
        method: Mapping[str, Any] | None = None,
    ):
        """
        Args:
            backbone: a ``configs/backbone`` node (name, source, lora, arch, tokenizer, ...).
            loss: a ``configs/loss`` node (``_target_`` + the loss's arguments).
            optim: ``lr`` (1e-4), ``weight_decay`` (0), ``warmup_steps`` (20), ``schedule``
                (linear|constant), ``betas`` (see :mod:`msl_rec.training.optim`).
            decoder: a ``configs/decoder`` node used for validation (NDCG/HR); None: validate by loss.
            top_k: cut-offs for the validation metrics.
            scoring: the top-level ``scoring:`` node (``target_logp``, ``num_negatives`` (0: no sampled
                rank), ``seed``, ``chunk_size``): the same signals as ``msl-rec-eval``'s.
            method: the ``method`` node (+ its encoder record) of a hybrid method (LLaRA, A-LLMRec): the
                backbone's input embedding reads encoder slots (:mod:`msl_rec.training.hybrid`); None: BIGRec.
            sft_ckpt: a checkpoint whose LoRA adapter is merged into the base before the fresh
                adapter is attached (S-DPO starts from it; the reference is the adapter disabled).
        """
        super().__init__()
        self.save_hyperparameters({"backbone": plain(backbone), "loss": plain(loss),
                                   "optim": plain(optim) or {}, "decoder": plain(decoder),
                                   "top_k": list(top_k), "sft_ckpt": str(sft_ckpt) if sft_ckpt else None,
                                   "scoring": plain(scoring), "method": plain(method)})
        self.loss = build_loss(self.hparams.loss, self.hparams.backbone)  # stats_at: null -> the backbone's
        self.model = None  # built in configure_model
        self._decoding_copy = None  # FSDP: a rank-local unsharded backbone for decoding (fsdp_utils)
        self._aligned = False  # A-LLMRec: stage 1 done (or loaded from a checkpoint)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location: Any = "cpu", **kwargs) -> RecLitModule:
        """Lightning's loader with ``weights_only=True``; errors name the file."""
        path = Path(checkpoint_path)
        ckpt = ckpt_state.read_checkpoint(path)  # small (adapter only): named errors for a bad or unsafe file
        # the classes its hyper_parameters name come from msl-rec's allowlist, checked before any is built
        check_targets(ckpt.get("hyper_parameters") or {}, source=f"checkpoint {path} (hyper_parameters)")
        kwargs.setdefault("weights_only", True)
        try:
            return super().load_from_checkpoint(path, map_location=map_location, **kwargs)
        except ckpt_state.CheckpointError as e:
            raise ckpt_state.CheckpointError(f"{path}: {e}") from e

    # ------------------------------------------------------------------ building
    def configure_model(self) -> None:
        if self.model is not None:
            return
        sft = self.hparams.get("sft_ckpt")
        # an LML run's adapter, of this backbone and LoRA rank: checked before anything is merged
        merge = ckpt_state.sft_adapter(sft, self.hparams.backbone) if sft else None
        self.model = build_backbone(self.hparams.backbone, merge_adapter=merge, merge_source=f"SFT checkpoint {sft}")
        if sft:
            log.info("merged the SFT adapter of %s (%d LoRA tensors) into the base model "
                     "(reference = adapter disabled)", sft, len(merge))
        method = self.hparams.get("method") or {}
        if method.get("kind") == "hybrid":
            slots = install_slots(self.model, hybrid.load_encoder(method), int(method["slot_base"]), method["name"],
                                  latent=int((method.get("stage1") or {}).get("latent", 128)))
            if sft:
                hybrid.load_sft_slots(slots, sft, method)
                self._aligned = True

    @property
    def slots(self) -> SlotEmbedding | None:
        """A hybrid method's slot embedding inside the backbone (None: BIGRec)."""
        return find_slots(self.model) if self.model is not None else None

    def configure_callbacks(self):
        return [TrainThroughput()]

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the adapter and loss state only, built from the trainable parameters (checkpoint.py)
        checkpoint["state_dict"] = ckpt_state.adapter_state_dict(self)
        checkpoint["adapter"] = ckpt_state.backbone_record(self.hparams.backbone, checkpoint["state_dict"])
        super().on_save_checkpoint(checkpoint)  # every rank's RNG state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load an adapter state (:func:`~msl_rec.models.checkpoint.adapter_state_dict`); its keys
        must match the model's exactly, whatever ``strict`` says."""
        if self.model is None:
            self.configure_model()
        ckpt_state.load_adapter_state_dict(self, state_dict)
        self._aligned = True  # a checkpoint of a hybrid run holds its stage-1 aligner
        return torch.nn.modules.module._IncompatibleKeys([], [])

    def on_fit_start(self) -> None:
        # from_pretrained hands the backbone over in eval mode and Lightning (>= 2.2) keeps each module's
        # mode: train mode here, so LoRA dropout (0.05) is on while training, as under HF's Trainer
        self.train()
        method = self.hparams.get("method") or {}
        if self.slots is not None and method.get("name") == "allmrec" and not self._aligned:
            self.eval()
            dm = self.trainer.datamodule
            stage1 = method.get("stage1") or {}
            hybrid.run_stage1(self.slots, self.model, dm, stage1, stage1.get("embedding_cache"))
            self._aligned = True
            self.train()

    # ------------------------------------------------------------------ forward
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, d) final hidden states (after the last norm); no lm_head."""
        return hidden_states(self.model, input_ids, attention_mask)

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

    def response_batch(self, batch: Mapping[str, torch.Tensor]) -> ResponseBatch:
        """Forward the backbone and gather the rows the loss scores (plus reference log-probs)."""
        with_negatives = self.loss.needs_reference or int(getattr(self.loss, "num_negatives", 0)) > 0
        if with_negatives and "neg_input_ids" in batch:
            input_ids, attention_mask, labels = merge_negatives(batch)
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
            ref_logps = reference_logps(self.model, lambda: self.hidden_states(input_ids, attention_mask)[:, :-1][mask],
                                        weight, tgt, seq_index, S)

        return ResponseBatch(hidden=hidden, labels=tgt, weight=weight, seq_index=seq_index, first=first,
                             num_sequences=S, valid_ids=valid_ids, ref_logps=ref_logps)

    @torch.no_grad()
    def valid_weights(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The paper's w (Eq. 7 / 10, Fig. 5) at every response position of ``batch``, tau 1, float32.

        Returns (N,) tensors: ``w_lml`` = 1 - P(y) under the full softmax, ``w_msl`` = 1 - P_valid(y)
        under the softmax over the position's valid set (0 where it holds one token), ``num_valid``
        = the valid-set size. Full-vocabulary logits are formed for the response positions only.
        """
        rb = self.response_batch({k: v for k, v in batch.items() if not k.startswith("neg_")})
        logits = rb.hidden @ rb.weight.t()
        return {"w_lml": positive_weight(logits, rb.labels), "w_msl": positive_weight(logits, rb.labels, rb.valid_ids),
                "num_valid": (rb.valid_ids >= 0).sum(1)}

    # ------------------------------------------------------------------ steps
    def _curriculum(self, batch_idx: int) -> tuple[bool, int] | None:
        """LLaRA: whether this micro-batch reads the encoder slots, and its index in the optimizer step (None: no
        curriculum)."""
        method = self.hparams.get("method") or {}
        cur = method.get("curriculum") or {}
        if self.slots is None or not cur.get("enabled", False):
            return None
        accumulate = max(int(getattr(self.trainer, "accumulate_grad_batches", 1)), 1)
        try:
            total = int(self.trainer.estimated_stepping_batches)
        except (RuntimeError, OverflowError):
            total = 0
        micro = batch_idx % accumulate
        return hybrid_step(int(cur.get("seed", 0)), int(self.global_step), micro, total), micro

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        curriculum = self._curriculum(batch_idx)
        if curriculum is not None:  # until the batch ends (after backward: a recomputed forward reads the same)
            use_items, micro = curriculum
            self.slots.use_items = use_items
            self._hybrid_flags = [*(getattr(self, "_hybrid_flags", []) if micro else []), use_items]
            # the share of this optimizer step's micro-batches so far; the logger keeps the step's last: its share
            self.log("train/hybrid", sum(self._hybrid_flags) / len(self._hybrid_flags), on_step=True, on_epoch=False)
        rb = self.response_batch(batch)
        loss, metrics = self.loss(rb)
        bs = int(batch["input_ids"].shape[0])
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=bs)
        for k, v in (metrics or {}).items():
            if k == "loss":  # logged above
                continue
            # the temperature in use beside the loss in the terminal's progress bar (ATS moves it)
            self.log(f"train/{k}", float(v), on_step=True, on_epoch=False, batch_size=bs, prog_bar=k == "tau")
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.slots is not None:
            self.slots.use_items = True  # validation and evaluation always read the slots

    def on_before_optimizer_step(self, optimizer) -> None:
        # once per optimizer step, whatever the gradient accumulation: per-step loss state (ATS)
        for k, v in self.loss.on_optimizer_step().items():
            self.log(f"train/{k}", float(v), on_step=True, on_epoch=False)

    def decoding_model(self):
        return self._decoding_copy.model if self._decoding_copy is not None else self.model

    def validation_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.loss(self.response_batch(batch))[0]

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        if self.hparams.decoder and is_fsdp(self.model):  # see fsdp_utils: why decoding needs full weights
            if self._decoding_copy is None:
                self._decoding_copy = DecodingCopy(lambda: build_backbone(self.hparams.backbone))
            self._decoding_copy.refresh(self.trainer.strategy.model, self.model)

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
        # optim._target_ (AdamW) instantiated as a partial over the trainable (LoRA) parameters
        opt = build_optimizer((p for p in self.parameters() if p.requires_grad), o)
        # every schedule needs the run's length: linear decays over it, and a warm-up as long caps to it
        try:
            total = int(self.trainer.estimated_stepping_batches)
        except (RuntimeError, OverflowError):  # no trainer attached (plain use), or an infinite loader
            total = None
        sched = build_lr_schedule(opt, o, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
