"""Constrained beam search equals brute force (cbs_masked) and transformers' generate (both modes)."""

from __future__ import annotations

import math

import pytest
import torch

from msl_rec.decoding import ConstrainedBeamSearch
from tests.decoding.conftest import rank

PROMPTS = ["hello there a", "my books", "i read dune and emma then"]


def brute_force_log_p_valid(model, tokenizer, catalog, prompt: str) -> dict[int, float]:
    """log P_valid(sequence | prompt) of every catalog sequence, one full forward pass each."""
    p = tokenizer.encode(prompt)
    out = {}
    for s, seq in enumerate(catalog.sequences):
        with torch.no_grad():
            logits = model(torch.tensor([p + seq])).logits[0].float()
        total = 0.0
        for t, tok in enumerate(seq):
            valid = torch.as_tensor(catalog.allowed(seq[:t]))
            row = logits[len(p) - 1 + t]
            total += float(row[tok] - torch.logsumexp(row[valid], 0))
        out[s] = total
    return out


def test_masked_lp0_is_top_k_by_log_p_valid(tiny_model, tokenizer, catalog, make_batch_fn):
    n = len(catalog.sequences)
    dec = ConstrainedBeamSearch(catalog, num_beams=n, mask="before", length_penalty=0.0, max_new_tokens=32)
    got = rank(dec, tiny_model, make_batch_fn(PROMPTS))
    for prompt, ranking in zip(PROMPTS, got):
        brute = brute_force_log_p_valid(tiny_model, tokenizer, catalog, prompt)
        expected = sorted(brute, key=lambda s: -brute[s])
        assert [s for s, _ in ranking] == expected
        assert [sc for _, sc in ranking] == pytest.approx([brute[s] for s in expected], abs=1e-4)
        assert math.log(sum(math.exp(v) for v in brute.values())) == pytest.approx(0.0, abs=1e-4)


def hf_reference(model, catalog, batch, num_beams, length_penalty, renormalize, max_new_tokens=32,
                 early_stopping=False, pad_token_id=0):
    """Run transformers' constrained beam search; per user, the real (sequence, score) pairs.

    ``batch``: left-padded ``prompt_input_ids`` / ``prompt_attention_mask`` (the data module's layout)."""
    width = batch["prompt_input_ids"].shape[1]

    def allowed(batch_id, sent):
        nxt = catalog.allowed(sent[width:].tolist())
        return nxt or [catalog.eos_id]  # dummy beams past EOS: any token, they never surface

    out = model.generate(input_ids=batch["prompt_input_ids"], attention_mask=batch["prompt_attention_mask"],
                         num_beams=num_beams, num_return_sequences=num_beams, do_sample=False,
                         prefix_allowed_tokens_fn=allowed, max_new_tokens=max_new_tokens,
                         eos_token_id=catalog.eos_id, pad_token_id=pad_token_id, length_penalty=length_penalty,
                         renormalize_logits=renormalize, early_stopping=early_stopping,
                         output_scores=True, return_dict_in_generate=True)
    seqs, scores = out.sequences[:, width:].tolist(), out.sequences_scores.tolist()
    res = []
    for u in range(batch["prompt_input_ids"].shape[0]):
        rows = []
        for j in range(u * num_beams, (u + 1) * num_beams):
            if scores[j] < -1e5:  # transformers' -1e9 placeholders / dummy beams
                continue
            gen = seqs[j][: seqs[j].index(catalog.eos_id) + 1]
            rows.append((catalog.sequence_at(catalog.node_of(gen)), scores[j]))
        res.append(rows)
    return res


@pytest.mark.parametrize("mask", ["after", "before"])
@pytest.mark.parametrize("num_beams,length_penalty", [(4, 1.0), (5, 0.0), (3, 2.0), (6, -0.5), (2, 1.0), (12, 1.0)])
def test_matches_transformers_generate(tiny_model, catalog, make_batch_fn, mask, num_beams, length_penalty):
    batch = make_batch_fn(PROMPTS)
    dec = ConstrainedBeamSearch(catalog, num_beams=num_beams, mask=mask, length_penalty=length_penalty,
                                max_new_tokens=32, top_k=[1])
    got = rank(dec, tiny_model, batch)
    ref = hf_reference(tiny_model, catalog, batch, num_beams, length_penalty, renormalize=mask == "before")
    for g, r in zip(got, ref):
        assert [s for s, _ in g] == [s for s, _ in r]
        assert [sc for _, sc in g] == pytest.approx([sc for _, sc in r], abs=1e-4)
        assert len(g) == num_beams


@pytest.mark.parametrize("early_stopping,length_penalty", [(True, 1.0), ("never", 1.0), ("never", -1.0)])
def test_early_stopping_modes_match_transformers(tiny_model, catalog, make_batch_fn, early_stopping, length_penalty):
    batch = make_batch_fn(PROMPTS)
    dec = ConstrainedBeamSearch(catalog, num_beams=4, mask="after", length_penalty=length_penalty,
                                max_new_tokens=32, early_stopping=early_stopping, top_k=[1])
    ref = hf_reference(tiny_model, catalog, batch, 4, length_penalty, renormalize=False, early_stopping=early_stopping)
    for g, r in zip(rank(dec, tiny_model, batch), ref):
        assert [s for s, _ in g] == [s for s, _ in r]
        assert [sc for _, sc in g] == pytest.approx([sc for _, sc in r], abs=1e-4)


def test_single_prompt_equals_batched(tiny_model, catalog, make_batch_fn):
    """Left padding does not change a user's result."""
    dec = ConstrainedBeamSearch(catalog, num_beams=5, top_k=[1, 5])
    batched = rank(dec, tiny_model, make_batch_fn(PROMPTS))
    for p, b in zip(PROMPTS, batched):
        (alone,) = rank(dec, tiny_model, make_batch_fn([p]))
        assert [s for s, _ in alone] == [s for s, _ in b]
        assert [sc for _, sc in alone] == pytest.approx([sc for _, sc in b], abs=1e-4)


@pytest.mark.parametrize("mask", ["after", "before"])
@pytest.mark.parametrize("num_beams", [3, 10, 25])
def test_shared_prompt_path_equals_full_cache_path_gqa(tokenizer, catalog, make_batch_fn, mask, num_beams):
    """The shared-prompt attention (grouped KV heads, ragged beams per user, users dropping out) gives
    the same rankings as re-gathering the full KV cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    batch = make_batch_fn(PROMPTS + ["x"])
    impl = model.config._attn_implementation
    fast = ConstrainedBeamSearch(catalog, num_beams=num_beams, mask=mask, top_k=[1], shared_prompt=True)
    slow = ConstrainedBeamSearch(catalog, num_beams=num_beams, mask=mask, top_k=[1], shared_prompt=False)
    for f, s in zip(rank(fast, model, batch), rank(slow, model, batch)):
        assert [x for x, _ in f] == [x for x, _ in s]
        assert [x for _, x in f] == pytest.approx([x for _, x in s], abs=1e-4)
    assert model.config._attn_implementation == impl  # restored after decoding
