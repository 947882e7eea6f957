"""The one inference layer around a (peft) causal LM: every model computation outside the training
forward goes through here (beam search, target log-likelihood, sampled rank), and the training-side
helpers (hidden states, output weight, positions) live here too, so there is one place for each.

Shapes: B users, T prompt positions, d hidden size, V vocabulary, Hkv key/value heads, R beam rows.

What it owns:

* **Dtype**: :class:`CausalLMInference` runs the model in its ``dtype`` (``float32`` by default): the
  model itself when its weights already are, else a frozen, adapter-merged copy
  (:class:`ModelCopies`); an enclosing autocast (Lightning's ``bf16-mixed``) is turned off around every
  call. Logits, log-softmax and log-probabilities are float32 whatever the weights' dtype.
* **Prompt encoding**: :meth:`LMRunner.encode_prompts` runs each user's prompt on its own real tokens
  (no padding), after the data's fixed preamble (the Alpaca header and instruction every prompt
  starts with), whose KV is computed once per weights version and reused. So a user's prompt KV, and
  everything computed from it, does not depend on the batch size, the other users or the shard
  layout. The KV is kept (:class:`EncodedPrompts`) for the beam search and the target's scoring: one
  prompt forward per user in all.
* **Beam rows**: :class:`BeamRows` continues the encoded prompts one token per beam row. For
  LLaMA-family models the prompt KV is read in place by all of a user's beams through the attention
  implementation of :mod:`msl_rec.models.prefix_attention` (swapped in for each step only); otherwise a
  full transformers cache is re-gathered per step. Next-token scores are computed for the given
  (row, token) candidates only where that is cheaper than the full output layer.
* **Sequence log-probabilities** of responses after encoded prompts (:meth:`LMRunner.response_logps`),
  several users' candidates in one forward.
* **Text embeddings** (:meth:`LMRunner.text_embeddings`, BIGRec's grounding): the final hidden state at
  a text's last token, the text run on its own; with the adapter or without (the backbone's own
  weights); a fixed set (the catalog's titles) computed once per weights version.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from msl_rec.losses.functional import masked_logsumexp, sequence_logps
from msl_rec.models import prefix_attention
from msl_rec.models.hybrid import SLOT_PARTS
from msl_rec.utils.precision import autocast_off, eval_dtype, weights_version

log = logging.getLogger(__name__)

SHARED_PROMPT_MODELS = ("llama",)  # attention = rotary + (GQA) softmax(q k^T * scaling) v, no sliding window
MIN_PREAMBLE = 8  # a shorter shared prompt start is not worth its own forward pass
FULL_HEAD_RATIO = 4  # candidates * 4 >= rows * V: the full output layer is cheaper than candidate dot products


# ---------------------------------------------------------------------------- model parts (training too)
def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone_body(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings .. final norm) of a (peft-wrapped) causal LM, without lm_head."""
    base = base_model(model)
    return base.get_decoder() if hasattr(base, "get_decoder") else base.model


def output_weight(model: nn.Module) -> torch.Tensor:
    """The (V, d) output embedding (lm_head) weight; tied to the input embedding for SmolLM2."""
    return model.get_output_embeddings().weight


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift the prompt."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, d) final hidden states (after the last norm; no lm_head) of a left-padded batch."""
    out = backbone_body(model)(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return out.last_hidden_state


def plain_head_weight(model: nn.Module) -> torch.Tensor | None:
    """The (V, d) weight when logits are exactly ``hidden @ weight.T`` (a plain bias-free ``nn.Linear``
    head, no soft-capping or logit scale), else None."""
    base = base_model(model)
    head = base.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    if getattr(base.config, "final_logit_softcapping", None) or getattr(base.config, "logit_scale", None):
        return None
    return head.weight


def prefix_attention_configs(model: nn.Module) -> list | None:
    """The configs whose ``_attn_implementation`` the attention layers read, if the model is a
    LLaMA-family one the shared-prompt attention supports (else None)."""
    base = base_model(model)
    cfg = getattr(base, "config", None)
    if getattr(cfg, "model_type", None) not in SHARED_PROMPT_MODELS:
        return None
    attn = [m for m in base.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    if not attn or len(attn) != cfg.num_hidden_layers:
        return None
    configs = {id(cfg): cfg}
    for m in attn:
        configs.setdefault(id(m.config), m.config)
    return list(configs.values())


# ---------------------------------------------------------------------------- dtype
class ModelCopies:
    """The model in a given dtype: the model itself when its weights already are, else a frozen copy
    with any LoRA adapter merged, rebuilt when the weights change (:func:`weights_version`). The
    training model is never cast in place. One copy per dtype is kept (and one without the adapter,
    for :meth:`LMRunner.text_embeddings` ``base=True``, only when asked for)."""

    def __init__(self):
        self._copies: dict[tuple[torch.dtype, bool], tuple[tuple, nn.Module]] = {}

    def get(self, model: nn.Module, dtype: torch.dtype, version: tuple | None = None,
            adapter: bool = True) -> nn.Module:
        """``adapter=False``: a copy of the backbone's own weights, any LoRA adapter removed unmerged
        (the model itself only when it has no adapter)."""
        if next(model.parameters()).dtype == dtype and (adapter or not hasattr(model, "unload")):
            return model
        version = weights_version(model) if version is None else version
        held = self._copies.get((dtype, adapter))
        if held is None or held[0] != version:
            self._copies.pop((dtype, adapter), None)  # free the old copy first
            frozen = copy.deepcopy(model)
            if dtype == torch.float32:  # up-casting is exact: cast first, so the merge runs in float32
                frozen = frozen.to(dtype)
            if not adapter and hasattr(frozen, "unload"):
                frozen = frozen.unload()
            elif hasattr(frozen, "merge_and_unload"):  # down-casting: merged in float32, then one rounding
                frozen = frozen.merge_and_unload()
            self._copies[(dtype, adapter)] = (version, frozen.to(dtype).eval())
        return self._copies[(dtype, adapter)][1]

    def held(self, dtype: torch.dtype, adapter: bool = True) -> nn.Module | None:
        """The copy currently held in ``dtype`` (None if none): for tests and memory checks."""
        held = self._copies.get((dtype, adapter))
        return None if held is None else held[1]


def embedding_fingerprint(body: nn.Module, texts: tuple, batch_size: int, base: bool) -> str:
    """SHA-256 of what text embeddings depend on: every parameter and buffer of ``body`` (names, dtypes,
    bytes; ``base``: without the switched-off LoRA adapter's), the texts' token ids and the batch size (which
    texts share a forward)."""
    h = hashlib.sha256(f"texts:{len(texts)}:{batch_size}".encode())
    for t in texts:
        h.update(np.asarray(t, dtype=np.int64).tobytes())
    for name, tensor in [*body.named_parameters(), *body.named_buffers()]:
        if (base and "lora_" in name) or f".{SLOT_PARTS}." in name:  # texts hold no slots
            continue
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_embeddings(path: Path, n: int) -> torch.Tensor | None:
    """The embeddings stored at ``path`` (data only: ``weights_only``), None when absent or not (n, d) float32."""
    if not path.is_file():
        return None
    try:
        out = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a truncated or foreign file is recomputed, not trusted
        log.warning("text embedding cache %s unreadable (%s); recomputing", path, e)
        return None
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.dim() != 2 or out.shape[0] != n \
            or not torch.isfinite(out).all():
        log.warning("text embedding cache %s does not hold %d finite float32 rows; recomputing", path, n)
        return None
    return out


def _write_embeddings(path: Path, out: torch.Tensor) -> None:
    """Atomically (a temporary file renamed over ``path``): a kill never leaves a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(out.detach().cpu(), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def backbone_version(model: nn.Module) -> tuple:
    """:func:`weights_version` of the backbone's own weights (every parameter but the LoRA adapter's and a
    hybrid method's slot parts): what the model computes on plain text with its adapter switched off,
    unchanged by training the adapter or the slot projectors."""
    return (id(model), model.training,
            tuple((id(p), p._version) for n, p in model.named_parameters()
                  if "lora_" not in n and f".{SLOT_PARTS}." not in n))


# ---------------------------------------------------------------------------- prompts
def preamble_len(tokens: np.ndarray, preamble: np.ndarray | None) -> int:
    """How many of a user's first prompt ``tokens`` are the shared ``preamble`` (0 if fewer than
    :data:`MIN_PREAMBLE`). At least one token is left out of it, so the user's last prompt position is
    computed with the user's own prompt. A function of the user's own tokens and the data's fixed
    preamble only, never of the other users of a batch: so is every number computed from it."""
    if preamble is None:
        return 0
    m = min(len(tokens) - 1, len(preamble))
    same = tokens[:m] == preamble[:m]
    n = m if same.all() else int(np.argmin(same))
    return n if n >= MIN_PREAMBLE else 0


@dataclass
class EncodedPrompts:
    """Each user's prompt KV, computed on the user's own tokens and right-padded to one width.

    Attributes:
        kv: per layer ``(k, v)`` of shape ``(B, Hkv, T, d)``, zeros after a user's length.
        lengths: (B,) int64 host array, real prompt tokens per user (= the next position id).
        last_hidden: (B, d) final hidden state of each user's last prompt token (predicts the first
            response token).
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    lengths: np.ndarray
    last_hidden: torch.Tensor

    def __len__(self) -> int:
        return len(self.lengths)

    def mask(self, users: torch.Tensor | None = None, width: int | None = None) -> torch.Tensor:
        """(n, width) int64 attention mask of the prompt KV (1 at real positions) of ``users`` (all)."""
        lengths = torch.from_numpy(self.lengths).to(self.last_hidden.device)
        if users is not None:
            lengths = lengths[users]
        width = self.kv[0][0].shape[2] if width is None else width
        return (torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]).long()


def _no_autocast(method):
    """Run a runner method under ``torch.no_grad`` with any enclosing autocast off (the dtype is ours)."""
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        with torch.no_grad(), autocast_off(self.device):
            return method(self, *args, **kwargs)
    return wrapped


class CausalLMInference:
    """Evaluation settings and the state kept across batches (the model copy, the preamble KV).

    Args:
        dtype: the weights' dtype while evaluating, ``"float32"`` (the default: the same numbers on
            every machine) or ``"bfloat16"`` (explicit, faster where bf16 is native); ``"auto"`` is an
            error (:func:`~msl_rec.utils.precision.eval_dtype`).
        shared_prompt: ``None`` (auto): beams read each user's prompt KV in place for LLaMA-family
            models, else a full cache is re-gathered per step; ``True`` / ``False`` force either.
        share_preamble: compute the KV of ``preamble_ids`` once per weights version and start every
            prompt that begins with it from that KV.
        preamble_ids: the prompt start the data gives every prompt (the Alpaca header and instruction:
            :meth:`~msl_rec.data.prompts.PromptBuilder.preamble_ids`); fixed for a dataset, so a user's
            split into preamble + own tokens never depends on the batch. None: no shared preamble.
        key: the config key ``dtype`` came from, for error messages.
    """

    def __init__(self, dtype: str = "float32", shared_prompt: bool | None = None, share_preamble: bool = True,
                 preamble_ids: Sequence[int] | None = None, key: str = "decoder.dtype"):
        self.torch_dtype = eval_dtype(dtype, key)
        self.dtype = dtype
        self.shared_prompt = shared_prompt
        self.share_preamble = bool(share_preamble)
        self.preamble_ids = (np.asarray(list(preamble_ids), dtype=np.int64)
                             if share_preamble and preamble_ids is not None and len(preamble_ids) else None)
        self.copies = ModelCopies()
        self.preamble: tuple | None = None  # (weights version, tokens, per-layer (k, v) of shape (1, Hkv, P, d))
        # text_embeddings(cache_key=...): (cache_key, base) -> (weights version, texts, (n, d) embeddings)
        self.text_cache: dict[tuple[str, bool], tuple[tuple, tuple, torch.Tensor]] = {}

    @property
    def compute_dtype(self) -> str:
        """The dtype of the weights and activations (``"float32"`` or ``"bfloat16"``); log-probs are fp32."""
        return self.dtype

    def bind(self, model: nn.Module) -> LMRunner:
        """A runner over ``model``'s current weights in this dtype."""
        version = weights_version(model)
        return LMRunner(self, self.copies.get(model, self.torch_dtype, version), version, source=model)


class LMRunner:
    """``model`` (already in the inference dtype) bound to its :class:`CausalLMInference`: the calls
    beam search and scoring make. Every call runs without grad and with autocast off. ``source``: the
    model ``model`` was made from (itself, or the model a dtype copy was made of; default ``model``)."""

    def __init__(self, owner: CausalLMInference, model: nn.Module, version: tuple, source: nn.Module | None = None):
        self.owner, self.model, self.version = owner, model, version
        self.source = model if source is None else source
        self.device = next(model.parameters()).device
        self.body = backbone_body(model)
        self.head_weight = plain_head_weight(model)
        if self.head_weight is None:
            raise ValueError(f"{type(base_model(model)).__name__}: evaluation needs a plain bias-free linear "
                             "output layer (logits = hidden @ W.T); this model's head is not one")
        configs = prefix_attention_configs(model) if owner.shared_prompt is not False else None
        if owner.shared_prompt and configs is None:
            raise ValueError(f"decoder.shared_prompt=True needs a LLaMA-family model ({', '.join(SHARED_PROMPT_MODELS)})")
        self.attn_configs = configs

    @property
    def vocab_size(self) -> int:
        return self.head_weight.shape[0]

    # ------------------------------------------------------------------ prompts
    @_no_autocast
    def encode_prompts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncodedPrompts:
        """Each user's prompt (the real tokens of a padded ``(B, T)`` batch) encoded on its own, after
        the shared preamble (module docstring)."""
        ids, real = input_ids.cpu().numpy(), attention_mask.cpu().numpy().astype(bool)
        rows = [ids[b][real[b]] for b in range(len(ids))]
        if min(map(len, rows)) < 1:
            raise ValueError("encode_prompts: a user has an empty prompt (attention_mask all 0)")
        pre = self._preamble_kv() if self.owner.preamble_ids is not None else None
        kvs, last = [], []
        for tokens in rows:
            n_pre = preamble_len(tokens, self.owner.preamble_ids)
            cache = DynamicCache([(k[:, :, :n_pre], v[:, :, :n_pre]) for k, v in pre]) if n_pre else None
            rest = torch.from_numpy(tokens[n_pre:]).to(self.device)[None]
            out = self.body(input_ids=rest, position_ids=torch.arange(n_pre, len(tokens), device=self.device)[None],
                            past_key_values=cache, use_cache=True)
            kvs.append([(layer.keys, layer.values) for layer in out.past_key_values.layers])
            last.append(out.last_hidden_state[0, -1])
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        width = int(lengths.max())
        kv = []
        for layer in range(len(kvs[0])):
            k0 = kvs[0][layer][0]
            k = k0.new_zeros(len(rows), k0.shape[1], width, k0.shape[3])
            v = k.clone()
            for b, user in enumerate(kvs):
                k[b, :, : lengths[b]] = user[layer][0][0]
                v[b, :, : lengths[b]] = user[layer][1][0]
            kv.append((k, v))
        return EncodedPrompts(kv=kv, lengths=lengths, last_hidden=torch.stack(last))

    def _preamble_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(k, v)`` of shape ``(1, Hkv, P, d)`` for the whole preamble (positions ``0..P-1``),
        computed once per weights version; a user sharing only its first ``n`` tokens reads ``[:n]``
        (causal attention: the KV of a prefix does not depend on what follows)."""
        held = self.owner.preamble
        if held is not None and held[0] == self.version:
            return held[2]
        tokens = self.owner.preamble_ids
        ids = torch.from_numpy(tokens).to(self.device)[None]
        out = self.body(input_ids=ids, position_ids=torch.arange(len(tokens), device=self.device)[None],
                        use_cache=True)
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        self.owner.preamble = (self.version, tokens, kv)
        return kv

    # ------------------------------------------------------------------ beams
    def beam_rows(self, prompts: EncodedPrompts) -> BeamRows:
        """One row per user, continuing its encoded prompt (see :class:`BeamRows`)."""
        return BeamRows(self, prompts)

    @contextlib.contextmanager
    def prefix_attention(self):
        """The shared-prompt attention implementation switched on (for one beam step)."""
        prefix_attention.register()
        with self.attention_implementation(prefix_attention.IMPL, self.attn_configs):
            yield

    @contextlib.contextmanager
    def attention_implementation(self, impl: str, configs: list | None = None):
        """transformers' attention implementation ``impl`` for the model's (or ``configs'``) attention
        layers while the context is open."""
        if configs is None:
            configs = list({id(m.config): m.config for m in self.model.modules()
                            if hasattr(getattr(m, "config", None), "_attn_implementation")}.values())
        saved = [c._attn_implementation for c in configs]
        for c in configs:
            c._attn_implementation = impl
        try:
            yield
        finally:
            for c, old in zip(configs, saved):
                c._attn_implementation = old

    # ------------------------------------------------------------------ responses
    @_no_autocast
    def response_logps(self, prompts: EncodedPrompts, users: Sequence[int], responses: Sequence[Sequence[int]],
                       valid_ids: Sequence[torch.Tensor] | None = None, chunk_size: int = 32) -> torch.Tensor:
        """(C,) float32 log-probability of each response (token ids, EOS included) after its user's
        encoded prompt, by teacher forcing from the prompt KV: ``sum_t log p(y_t | prompt, y_<t)``.

        Args:
            users: (C,) the user (index into ``prompts``) of each response.
            responses: C token-id lists.
            valid_ids: None: full-vocabulary softmax; else per response a ``(len, K)`` tensor of the
                trie-valid ids at each position (-1 padded) to renormalise over.
            chunk_size: responses per forward (memory: as many copies of a prompt's KV). A chunk of one
                runs on exactly the user's own tokens, so its result does not depend on the batch.
        """
        if len(users) != len(responses) or (valid_ids is not None and len(valid_ids) != len(responses)):
            raise ValueError("response_logps: users, responses and valid_ids need one entry per response")
        out = [self._chunk_logps(prompts, users[lo: lo + chunk_size], responses[lo: lo + chunk_size],
                                 None if valid_ids is None else valid_ids[lo: lo + chunk_size])
               for lo in range(0, len(responses), chunk_size)]
        return torch.cat(out) if out else torch.zeros(0)

    def _chunk_logps(self, prompts, users, responses, valid_ids) -> torch.Tensor:
        device = self.device
        idx = torch.as_tensor(list(users), dtype=torch.long, device=device)
        c, width = len(responses), max(map(len, responses))
        toks = torch.zeros(c, width, dtype=torch.long, device=device)
        real = torch.zeros(c, width, dtype=torch.bool, device=device)
        for i, r in enumerate(responses):
            toks[i, : len(r)] = torch.as_tensor(list(r), device=device)
            real[i, : len(r)] = True
        hidden = prompts.last_hidden[idx][:, None]  # (c, 1, d) predicts each response's first token
        if width > 1:  # positions 1.. are predicted from the response tokens before them
            lengths = prompts.lengths[list(users)]
            tp = int(lengths.max())  # only as wide as these users' prompts
            cache = DynamicCache([(k.index_select(0, idx)[:, :, :tp], v.index_select(0, idx)[:, :, :tp])
                                  for k, v in prompts.kv])
            # right padding: a real token never attends to the pads after it (causal)
            attn = torch.cat([prompts.mask(idx, tp), real.new_ones(c, width - 1).long()], dim=1)
            pos = torch.from_numpy(lengths).to(device)[:, None] + torch.arange(width - 1, device=device)
            # eager attention: PyTorch's CPU SDPA kernel for a few queries over a long cache sums in an order
            # that depends on the thread count (target_logp moved by ~1e-7 relative between 1 and 2 threads)
            with self.attention_implementation("eager"):
                step = self.body(input_ids=toks[:, :-1], past_key_values=cache, attention_mask=attn,
                                 position_ids=pos, use_cache=True)
            hidden = torch.cat([hidden, step.last_hidden_state], dim=1)
        seq_index = torch.arange(c, device=device)[:, None].expand_as(real)[real]
        valid = None
        if valid_ids is not None:
            k = max(v.shape[1] for v in valid_ids)
            valid = torch.cat([torch.nn.functional.pad(v, (0, k - v.shape[1]), value=-1) for v in valid_ids]).to(device)
        return sequence_logps(hidden[real].float(), self.head_weight.float(), toks[real], seq_index, c, valid)

    # ------------------------------------------------------------------ texts
    @_no_autocast
    def text_embeddings(self, texts: Sequence[Sequence[int]], base: bool = False, cache_key: str | None = None,
                        batch_size: int = 64, store: str | Path | None = None) -> torch.Tensor:
        """(n, d) float32 final hidden state (after the last norm: transformers' ``hidden_states[-1]``) at
        each text's last token, each text (token ids, nothing added) run on its own from position 0.

        Args:
            base: embed with the backbone's own weights, the LoRA adapter switched off (BIGRec embeds
                with the un-tuned LLM); False: with the model as evaluated.
            cache_key: keep the result under this name and return it while the weights
                (:func:`weights_version`; with ``base``, :func:`backbone_version`) and ``texts`` are
                unchanged: the catalog's titles are embedded once per weights version.
            batch_size: texts per forward. Only texts of one length share a forward (no padding), so a
                text's embedding does not depend on the others beyond float rounding; 1: exactly alone.
            store: with ``cache_key``, also keep the result in this folder, named by the SHA-256 of the
                embedding weights' bytes (in the inference dtype), the texts and the batch size: the
                catalog's titles are embedded once per weights content across processes (a SmolLM2 catalog
                is ~15 min on one CPU core). A file that does not match is recomputed, never trusted.
        """
        if not texts or min(map(len, texts)) < 1:
            raise ValueError("text_embeddings: every text needs at least one token")
        key = (cache_key, bool(base))
        version = (backbone_version(self.source) if base else self.version) if cache_key is not None else None
        held = self.owner.text_cache.get(key) if cache_key is not None else None
        frozen = tuple(map(tuple, texts)) if cache_key is not None else None
        if held is not None and held[0] == version and held[1] == frozen:
            return held[2]
        path = None
        if cache_key is not None and store is not None:
            with self._embedding_body(base) as body:
                path = Path(store) / f"{embedding_fingerprint(body, frozen, batch_size, base)}.pt"
            cached = _read_embeddings(path, len(texts))
            if cached is not None:
                cached = cached.to(self.device)
                self.owner.text_cache[key] = (version, frozen, cached)
                return cached
        lengths = np.array([len(t) for t in texts])
        rows_of, last = [], []
        with self._embedding_body(base) as body:
            configs = list({id(m.config): m.config for m in body.modules()
                            if hasattr(getattr(m, "config", None), "_attn_implementation")}.values())
            # eager attention, as response_logps: CPU SDPA's sum order depends on the thread count
            with self.attention_implementation("eager", configs):
                for length in np.unique(lengths).tolist():
                    same = np.nonzero(lengths == length)[0]
                    for lo in range(0, len(same), batch_size):
                        rows = same[lo: lo + batch_size]
                        ids = torch.tensor([list(texts[i]) for i in rows], dtype=torch.long, device=self.device)
                        pos = torch.arange(length, device=self.device)[None].expand(len(rows), -1)
                        hidden = body(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
                        rows_of.append(rows)
                        last.append(hidden[:, -1].float())
        stacked = torch.cat(last)
        out = torch.empty_like(stacked)
        out[torch.from_numpy(np.concatenate(rows_of)).to(self.device)] = stacked
        if cache_key is not None:
            self.owner.text_cache[key] = (version, frozen, out)
        if path is not None:
            _write_embeddings(path, out)
        return out

    @contextlib.contextmanager
    def _embedding_body(self, base: bool):
        """The decoder stack to embed texts with: this runner's, or (``base``) one without the LoRA
        adapter: the model itself under peft's ``disable_adapter()`` when this runner runs it directly,
        else an adapter-free copy in the inference dtype (:class:`ModelCopies`)."""
        if not base or not hasattr(self.source, "disable_adapter"):
            yield self.body
        elif self.model is self.source:
            with self.source.disable_adapter():
                yield self.body
        else:
            yield backbone_body(self.owner.copies.get(self.source, self.owner.torch_dtype, self.version, adapter=False))


class BeamRows:
    """Beam rows continuing encoded prompts one token at a time; rows are grouped by user.

    :meth:`log_probs` scores candidate next tokens of the current rows; :meth:`advance` makes chosen
    candidates the new rows and runs them one token further. Initially row ``b`` is user ``b``.
    """

    def __init__(self, runner: LMRunner, prompts: EncodedPrompts):
        self.runner = runner
        self.hidden = prompts.last_hidden  # (R, d): the current rows' final hidden states
        self.next_pos = torch.from_numpy(prompts.lengths).to(runner.device)  # (R,) next token's position id
        self.state = self.cache = self.attn = None
        if runner.attn_configs is not None:  # prompt KV kept once per user, generated KV per row
            self.state = prefix_attention.PrefixState(prompts.kv, prompts.mask())
        else:  # a full cache per row, re-gathered each step
            self.cache, self.attn = DynamicCache(list(prompts.kv)), prompts.mask()

    @_no_autocast
    def log_probs(self, rows: np.ndarray, toks: np.ndarray, renormalize: bool) -> torch.Tensor:
        """(n,) float32 log-probability of each candidate ``(rows[i], toks[i])`` (host arrays, rows
        ascending): under the full-vocabulary softmax, or (``renormalize``) under the softmax over each
        row's candidates only, for which only the candidates' logits are formed when that is cheaper."""
        weight, n_rows = self.runner.head_weight, len(self.hidden)
        t_rows = torch.from_numpy(rows).to(self.device)
        t_toks = torch.from_numpy(toks).to(self.device)
        full = not renormalize or len(toks) * FULL_HEAD_RATIO >= n_rows * weight.shape[0]
        if full:
            logits = (self.hidden @ weight.T).float()
            if not renormalize:  # as transformers' generate computes it, so its scores are matched to the bit
                return torch.log_softmax(logits, dim=-1)[t_rows, t_toks]
            sel = logits[t_rows, t_toks]
        else:
            sel = (self.hidden.float()[t_rows] * weight[t_toks].float()).sum(-1)
        # each row's candidates on a (rows, widest) grid, -inf padded: one masked log-softmax per row
        counts = np.bincount(rows, minlength=n_rows)
        slot = torch.from_numpy(np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]).to(self.device)
        grid = sel.new_full((n_rows, int(counts.max())), float("-inf"))
        grid[t_rows, slot] = sel
        return sel - masked_logsumexp(grid)[t_rows]

    @_no_autocast
    def top_tokens(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's ``k`` most probable next tokens under the full-vocabulary softmax, best first:
        ``(log_probs (R, k) float32, token ids (R, k))`` (``k`` capped at V). Full logits only for the
        current rows (generated positions), formed as :meth:`log_probs` forms them (transformers' way)."""
        logits = (self.hidden @ self.runner.head_weight.T).float()
        return torch.log_softmax(logits, dim=-1).topk(min(k, logits.shape[-1]), dim=-1)

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @_no_autocast
    def advance(self, keep_users: np.ndarray, row_user: np.ndarray, src: np.ndarray, toks: np.ndarray) -> None:
        """Make the chosen candidates the rows and run one token each.

        Args:
            keep_users: (U,) bool, the current live users that keep at least one row.
            row_user: (R',) the new rows' user, as an index into the kept users (grouped, ascending).
            src: (R',) the current row each new row continues.
            toks: (R',) the token each new row appends.
        """
        device, body = self.device, self.runner.body
        t_src = torch.from_numpy(src).to(device)
        pos = self.next_pos[t_src]
        self.next_pos = pos + 1
        step_ids = torch.from_numpy(toks).to(device)[:, None]
        if self.state is None:
            self.cache.reorder_cache(t_src)
            self.attn = torch.cat([self.attn[t_src], self.attn.new_ones(len(src), 1)], dim=1)
            out = body(input_ids=step_ids, attention_mask=self.attn, position_ids=pos[:, None],
                       past_key_values=self.cache, use_cache=True)
            self.cache = out.past_key_values
        else:
            if not keep_users.all():
                self.state.drop_users(torch.from_numpy(np.nonzero(keep_users)[0]).to(device))
            self.state.set_rows(row_user, src, int(keep_users.sum()))
            with self.runner.prefix_attention():
                out = body(input_ids=step_ids, position_ids=pos[:, None], use_cache=False, prefix_state=self.state)
        self.hidden = out.last_hidden_state[:, -1]
