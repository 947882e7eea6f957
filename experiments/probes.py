"""A callback that checks a training run from outside: ``+callbacks.probe._target_=experiments.probes.LogitProbe
+callbacks.probe.dirpath=<dir>`` (tests/test_distributed.py, experiments/gpu_check.py).

After fit, every rank computes logits on a fixed batch through the trained (possibly sharded) model,
and through the FSDP decoding copy when there is one; rank 0 saves them, with the peak GPU memory,
to ``<dirpath>/probe.pt``."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


def probe_batch(vocab_size: int = 49152) -> tuple[torch.Tensor, torch.Tensor]:
    """Two fixed rows of 12 tokens, the second left-padded by 3."""
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(3, vocab_size, (2, 12), generator=g)
    am = torch.ones_like(ids)
    am[1, :3] = 0
    return ids, am


class LogitProbe(L.Callback):
    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    @torch.no_grad()
    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        ids, am = (t.to(pl_module.device) for t in probe_batch())
        was_training = pl_module.training
        trainer.strategy.model.eval()
        # through the strategy's wrapper (the FSDP root under FSDP): the same collectives on every rank
        out = {"trained": trainer.strategy.model(ids, am).float().cpu()}
        copy = getattr(pl_module, "_decoding_copy", None)
        if copy is not None and copy.model is not None:
            from msl_rec.models.inference import backbone_body, output_weight, position_ids_from_mask

            h = backbone_body(copy.model)(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am),
                                          use_cache=False).last_hidden_state
            out["decoding_copy"] = (h @ output_weight(copy.model).t()).float().cpu()
        trainer.strategy.model.train(was_training)
        if torch.cuda.is_available():
            out["peak_gpu_bytes"] = torch.tensor(torch.cuda.max_memory_allocated())
        if trainer.global_rank == 0:
            torch.save(out, self.dirpath / "probe.pt")
