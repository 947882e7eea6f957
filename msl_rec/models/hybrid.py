"""Hybrid prompts: an LLM whose prompt carries a frozen sequential encoder's embeddings (LLaRA, A-LLMRec).

A hybrid prompt is a token-id row like any other, with *slot ids* beside the tokenizer's ids
(:class:`~msl_rec.data.prompts.SlotPromptBuilder` writes them): ``slot_base + i`` is item ``i``'s slot (``i``
the encoder's item index, :class:`~msl_rec.data.sequences.TitleCatalog`), ``slot_base + num_items`` the
user slot. :class:`SlotEmbedding` replaces the backbone's input embedding (``embed_tokens``): token ids embed
as before (the same weight Parameter, still tied to lm_head where the backbone ties it), slot ids become the
method's projected encoder embeddings. Every path that runs the backbone on ids (training, the inference
layer's prompt KV, constrained beam search, grounding, ``target_logp``) therefore reads the slots unchanged.

- **LLaRA** (Liao et al., SIGIR 2024; ``model/model_interface.py`` ``wrap_emb``, ``model/mlp_projector.py``):
  item slot = ``MlpProjector(SASRec.item_embeddings(i))`` (Linear(H, d), GELU, Linear(d, d)). Its curriculum's
  text-only batches fill the slots with a placeholder ([PH]); here the mean token embedding
  (``use_items = False``), which is what transformers' ``resize_token_embeddings`` gives a new token.
- **A-LLMRec** (Kim et al., KDD 2024; ``models/a_llmrec_model.py``): stage 1 (:func:`align_items`) trains
  ``aligner`` (two_layer_mlp: Linear(H, 128), sigmoid, Linear(128, H)) to match title text embeddings,
  reconstruct the item embedding and score with the user state; stage 2: item slot =
  ``item_emb_proj(aligner.latent(i))`` (Linear(128, d), LayerNorm, GELU, Linear(d, d)), user slot =
  ``log_emb_proj(SASRec.encode(history))`` (Linear(H, d), LayerNorm, LeakyReLU, Linear(d, d)), the history
  being the item slots that follow the user slot in the same row.

The encoder is frozen and kept in eval mode (no dropout) whatever the module's mode, as both originals do.
Parameters under ``slot_parts`` other than the encoder's are the method's state: saved in checkpoints
(:data:`KEEP_ATTR`) even when frozen (A-LLMRec's aligner in stage 2, a projector under S-DPO).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SLOT_PARTS = "slot_parts"
"""Child name of the method's modules inside :class:`SlotEmbedding`: text embeddings (which never hold slots)
and their disk cache ignore what lies under it."""
KEEP_ATTR = "_msl_rec_keep"
"""A parameter carrying this attribute (True) is saved in checkpoints even when frozen."""
KINDS = ("llara", "allmrec")


class MlpProjector(nn.Module):
    """LLaRA's ``MlpProjector``: Linear(rec, llm), GELU, Linear(llm, llm)."""

    def __init__(self, rec_size: int, llm_size: int):
        super().__init__()
        self.mlp_proj = nn.Sequential(nn.Linear(rec_size, llm_size), nn.GELU(), nn.Linear(llm_size, llm_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_proj(x)


class TwoLayerMLP(nn.Module):
    """A-LLMRec's ``two_layer_mlp``: ``fc1`` (dims -> latent), sigmoid, ``fc2`` (latent -> dims);
    returns (latent, reconstruction)."""

    def __init__(self, dims: int, latent: int = 128):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dims, latent), nn.Linear(latent, dims)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.sigmoid(self.fc1(x))
        return z, self.fc2(z)


def _allmrec_projector(inp: int, d: int, act: nn.Module) -> nn.Sequential:
    """A-LLMRec's ``item_emb_proj`` / ``log_emb_proj``: Linear, LayerNorm, act, Linear; xavier-normal weights."""
    proj = nn.Sequential(nn.Linear(inp, d), nn.LayerNorm(d), act, nn.Linear(d, d))
    nn.init.xavier_normal_(proj[0].weight)
    nn.init.xavier_normal_(proj[3].weight)
    return proj


class SlotEmbedding(nn.Embedding):
    """The backbone's token embedding plus encoder slots (see the module docstring).

    Args:
        tokens: the backbone's ``nn.Embedding``; its weight Parameter is taken over (ties kept).
        encoder: the frozen sequential encoder (``SASRec``: ``item_embeddings``, ``encode``, ``num_items``).
        slot_base: the first slot id (the tokenizer's size; >= ``tokens.num_embeddings``).
        kind: ``llara`` or ``allmrec``.
        latent: A-LLMRec's aligned width (stage 1).
    """

    def __init__(self, tokens: nn.Embedding, encoder: nn.Module, slot_base: int, kind: str, latent: int = 128):
        if kind not in KINDS:
            raise ValueError(f"method: a hybrid method is one of {list(KINDS)}; got {kind!r}")
        if slot_base < tokens.num_embeddings:
            raise ValueError(f"slot ids start at {slot_base} (the tokenizer's size) but the backbone embeds "
                             f"{tokens.num_embeddings} token ids: slots would overlap real tokens; the tokenizer "
                             "and backbone do not belong together")
        super().__init__(tokens.num_embeddings, tokens.embedding_dim, padding_idx=tokens.padding_idx,
                         _weight=tokens.weight.detach(), _freeze=True)
        self.weight = tokens.weight  # the same Parameter: lm_head stays tied to it where it was
        self.kind, self.slot_base, self.num_items = kind, int(slot_base), int(encoder.num_items)
        d, hidden = tokens.embedding_dim, encoder.item_embeddings.embedding_dim
        parts = nn.ModuleDict({"encoder": encoder})
        if kind == "llara":
            parts["item_projector"] = MlpProjector(hidden, d)
        else:
            parts["aligner"] = TwoLayerMLP(hidden, latent)
            parts["item_projector"] = _allmrec_projector(latent, d, nn.GELU())
            parts["user_projector"] = _allmrec_projector(hidden, d, nn.LeakyReLU())
        setattr(self, SLOT_PARTS, parts)
        encoder.requires_grad_(False)
        parts["encoder"].eval()
        for name, p in parts.named_parameters():
            if not name.startswith("encoder."):
                setattr(p, KEEP_ATTR, True)
        if kind == "allmrec":
            parts["aligner"].requires_grad_(False)  # trained in stage 1 only (align_items)
        self.use_items = True  # False: LLaRA's text-only curriculum steps (placeholder in every slot)

    @property
    def parts(self) -> nn.ModuleDict:
        return getattr(self, SLOT_PARTS)

    def train(self, mode: bool = True) -> SlotEmbedding:
        super().train(mode)
        self.parts["encoder"].eval()  # frozen and deterministic (no dropout), as LLaRA's rec_model.eval()
        return self

    # ---------------------------------------------------------------------------------- slots
    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """(n, d) projected embeddings of encoder item indices ``items`` (n,)."""
        emb = self.parts["encoder"].item_embeddings(items)
        if self.kind == "allmrec":
            emb = self.parts["aligner"](emb)[0]
        return self.parts["item_projector"](emb)

    def user_vector(self, history: torch.Tensor) -> torch.Tensor:
        """(d,) A-LLMRec's projected user representation of one history (L,) of encoder item indices."""
        enc = self.parts["encoder"]
        history = history[-enc.max_len:]
        state = enc.encode(history[None], torch.tensor([len(history)], device=history.device))
        return self.parts["user_projector"](state)[0]

    def placeholder(self) -> torch.Tensor:
        """(d,) the text-only slot embedding: the mean token embedding (a new token's, as resized)."""
        return self.weight.detach().mean(0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        slot = input_ids >= self.slot_base
        out = F.embedding(input_ids.masked_fill(slot, 0), self.weight, self.padding_idx)
        if not bool(slot.any()):
            return out
        index = (input_ids - self.slot_base).masked_fill(~slot, -1)
        if bool((index > self.num_items).any()):
            raise ValueError(f"slot id {int(index.max()) + self.slot_base}: past the user slot "
                             f"{self.slot_base + self.num_items} (the encoder has {self.num_items} items); the prompt "
                             "was built for another encoder")
        item, user = slot & (index < self.num_items), index == self.num_items
        if not self.use_items:
            vec = self.placeholder().to(out.dtype)
            return torch.where(slot[..., None], vec, out)
        with one_thread(out.device):
            return self._fill_slots(out, index, item, user)

    def _fill_slots(self, out: torch.Tensor, index: torch.Tensor, item: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        if bool(item.any()):
            # one row at a time: a matrix product's rows round differently with the number of rows (CPU kernels
            # pick their blocking by size), so one product over the batch made a row's slots depend on its
            # batch-mates in batched forwards (training; evaluation encodes each prompt alone anyway)
            vecs = torch.cat([self.item_vectors(row[mask]) for row, mask in zip(index, item) if bool(mask.any())])
            out = out.masked_scatter(item[..., None].expand_as(out), vecs.to(out.dtype))
        if bool(user.any()):
            if self.kind != "allmrec":
                raise ValueError(f"method={self.kind} has no user slot (id {self.slot_base + self.num_items})")
            vecs = []
            for b, t in user.nonzero().tolist():
                later = item[b, t + 1:]
                if not bool(later.any()):
                    raise ValueError(f"a user slot (row {b}, position {t}) with no item slot after it in the same "
                                     "forward: the user representation is read from the history that follows it")
                vecs.append(self.user_vector(index[b, t + 1:][later]))
            out = out.masked_scatter(user[..., None].expand_as(out), torch.stack(vecs).to(out.dtype))
        return out


@contextlib.contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """On CPU, the slots' small products and norms on one thread: split over threads they round differently
    (A-LLMRec's slot embeddings moved by 1.4e-6 and a target_logp by 1.3e-5 between 1 and 2 threads, so a
    machine's core count changed the scores); they are a few dozen rows, so one thread costs nothing."""
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def install_slots(model: nn.Module, encoder: nn.Module, slot_base: int, kind: str, latent: int = 128
                  ) -> SlotEmbedding:
    """Replace ``model``'s (a peft-wrapped causal LM's) input embedding with a :class:`SlotEmbedding`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tokens = base.get_input_embeddings()
    if isinstance(tokens, SlotEmbedding):
        return tokens
    if type(tokens) is not nn.Embedding:
        raise TypeError(f"hybrid methods need a plain nn.Embedding input embedding; the backbone has "
                        f"{type(tokens).__name__}")
    slots = SlotEmbedding(tokens, encoder, slot_base, kind, latent).to(tokens.weight.device)
    base.set_input_embeddings(slots)
    return slots


def find_slots(model: nn.Module) -> SlotEmbedding | None:
    """The :class:`SlotEmbedding` inside ``model``, None for a plain backbone."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = base.get_input_embeddings()
    return emb if isinstance(emb, SlotEmbedding) else None


def hybrid_step(seed: int, step: int, micro: int, total_steps: int) -> bool:
    """LLaRA's curriculum: is this micro-batch hybrid? True with probability ``(step + 1) / total_steps``
    (``TrainCollater``: ``p < cur_step / max_step``), drawn from ``(seed, step, micro)`` alone so a resumed run
    draws the same."""
    if total_steps < 1:
        return True
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step) * 1_009 + int(micro))
    return float(torch.rand((), generator=gen)) < (step + 1) / total_steps


def align_items(slots: SlotEmbedding, text: torch.Tensor, history: torch.Tensor, lengths: torch.Tensor,
                targets: torch.Tensor, cfg: Mapping[str, Any]) -> dict[str, float]:
    """A-LLMRec's stage 1 (``pre_train_phase1``) on training windows: trains ``slots.parts.aligner``.

    Args:
        text: (num_items, D) title text embeddings in the encoder's item order (float32).
        history: (N, L) right-padded encoder item indices; lengths (N,); targets (N,) target indices.
        cfg: ``epochs``, ``lr``, ``batch_size``, ``latent``, ``seed`` (``method.stage1``).

    Per batch: the frozen user state u and item embeddings of the target (pos) and one uniform other item
    (neg); the aligner's (latent, reconstruction) of each and a text MLP's of their text embeddings; loss =
    BCE(mean(u * rec_pos), 1) + BCE(mean(u * rec_neg), 0) + MSE(latent_item, latent_text) (pos + neg)
    + 0.5 MSE(rec_item, item) + 0.2 MSE(rec_text, text), as released (its SBERT text encoder is fine-tuned
    there; here the text embeddings are fixed). Returns the last epoch's mean losses.
    """
    enc, aligner = slots.parts["encoder"], slots.parts["aligner"]
    gen = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
    with torch.random.fork_rng(devices=[]):  # the text MLP's init from the stage's seed, the run's RNG untouched
        torch.manual_seed(int(cfg.get("seed", 0)))
        text_mlp = TwoLayerMLP(text.shape[1], aligner.fc1.out_features)
    aligner.requires_grad_(True)
    params = [*aligner.parameters(), *text_mlp.parameters()]
    opt = torch.optim.Adam(params, lr=float(cfg.get("lr", 1e-4)))
    with torch.no_grad():
        users = torch.cat([enc.encode(history[i:i + 256], lengths[i:i + 256]) for i in range(0, len(history), 256)])
    n, bs, I = len(targets), int(cfg.get("batch_size", 32)), enc.num_items
    totals: dict[str, float] = {}
    for _ in range(int(cfg.get("epochs", 10))):
        order = torch.randperm(n, generator=gen)
        negs = torch.randint(0, I - 1, (n,), generator=gen)
        negs = negs + (negs >= targets).long()  # uniform over the other items
        totals = {"rec": 0.0, "match": 0.0, "item_rec": 0.0, "text_rec": 0.0}
        for lo in range(0, n, bs):
            rows = order[lo:lo + bs]
            u, pos, neg = users[rows], targets[rows], negs[rows]
            pos_e, neg_e = enc.item_embeddings(pos).detach(), enc.item_embeddings(neg).detach()
            (pz, pr), (nz, nr) = aligner(pos_e), aligner(neg_e)
            (tpz, tpr), (tnz, tnr) = text_mlp(text[pos]), text_mlp(text[neg])
            rec = (F.binary_cross_entropy_with_logits((u * pr).mean(1), torch.ones(len(rows)))
                   + F.binary_cross_entropy_with_logits((u * nr).mean(1), torch.zeros(len(rows))))
            match = F.mse_loss(pz, tpz) + F.mse_loss(nz, tnz)
            item_rec = F.mse_loss(pr, pos_e) + F.mse_loss(nr, neg_e)
            text_rec = F.mse_loss(tpr, text[pos]) + F.mse_loss(tnr, text[neg])
            loss = rec + match + 0.5 * item_rec + 0.2 * text_rec
            if not math.isfinite(float(loss)):
                raise FloatingPointError(f"A-LLMRec stage 1: loss {float(loss)} (not finite); lower method.stage1.lr")
            opt.zero_grad()
            loss.backward()
            opt.step()
            batches = math.ceil(n / bs)
            for k, v in (("rec", rec), ("match", match), ("item_rec", item_rec), ("text_rec", text_rec)):
                totals[k] += float(v) / batches
    aligner.requires_grad_(False)
    return totals
