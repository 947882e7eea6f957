"""Models: LLM backbones + LoRA and the one inference layer (``backbone``, ``inference``), checkpoints, and the
item-ID sequential recommenders (``sequential``: SASRec, BERT4Rec)."""

from msl_rec.models.sequential import BERT4Rec, SASRec

__all__ = ["BERT4Rec", "SASRec"]
