"""Recommendation losses: one small module per loss over a shared :class:`ResponseBatch`.

``LMLLoss`` (language modelling, the BIGRec baseline), ``MSLLoss`` (masked softmax over the trie's
valid tokens), ``MSLATSLoss`` (MSL with adaptive temperature) and ``SDPOLoss`` (softmax DPO).
The pure functions behind them are in :mod:`msl_rec.losses.functional`.
"""

from msl_rec.losses.base import RecLoss, ResponseBatch
from msl_rec.losses.lml import LMLLoss
from msl_rec.losses.msl import MSLATSLoss, MSLLoss
from msl_rec.losses.sdpo import SDPOLoss

__all__ = ["LMLLoss", "MSLATSLoss", "MSLLoss", "RecLoss", "ResponseBatch", "SDPOLoss"]
