"""The decoding speed paths give the fp32 full-prompt results: the shared preamble (computed once,
reused, invalidated when the weights change) and bf16 decoding through a frozen copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msl_rec.decoding import ConstrainedBeamSearch, build_decoder
from msl_rec.evaluation.predict import BatchPredictor
from msl_rec.models.inference import CausalLMInference, preamble_len
from tests.decoding.conftest import rank
from tests.decoding.test_beam_exact import hf_reference

PREAMBLE = "below is an instruction "  # 24 char tokens shared by every prompt, as the Alpaca header is
PROMPTS = [PREAMBLE + p for p in ["hello there a", "my books", "i read dune and emma then"]]
OTHERS = [PREAMBLE + p for p in ["go home", "kites and hats"]]


def preamble_ids(make_batch_fn) -> list[int]:
    """The real token ids of PREAMBLE as the batches tokenise it."""
    b = make_batch_fn([PREAMBLE])
    return b["prompt_input_ids"][0][b["prompt_attention_mask"][0].bool()].tolist()


def assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        assert [s for s, _ in g] == [s for s, _ in w]
        assert [sc for _, sc in g] == pytest.approx([sc for _, sc in w], abs=1e-4)


@pytest.mark.parametrize("shared_prompt", [True, False])
@pytest.mark.parametrize("mask", ["after", "before"])
def test_shared_preamble_equals_full_prompts_and_transformers(tiny_model, catalog, make_batch_fn, mask, shared_prompt):
    kw = {"num_beams": 4, "mask": mask, "max_new_tokens": 32, "top_k": [1], "shared_prompt": shared_prompt}
    fast = ConstrainedBeamSearch(catalog, share_preamble=True, **kw)
    plain = ConstrainedBeamSearch(catalog, share_preamble=False, **kw)
    batch = make_batch_fn(PROMPTS)
    pre = preamble_ids(make_batch_fn)
    shared = CausalLMInference(share_preamble=True, preamble_ids=pre)
    unshared = CausalLMInference(share_preamble=False, preamble_ids=pre)
    got = rank(fast, tiny_model, batch, shared)
    assert shared.preamble is not None and len(shared.preamble[1]) == len(PREAMBLE)  # it really was shared
    assert_same(got, rank(plain, tiny_model, batch, unshared))
    assert unshared.preamble is None
    assert_same(got, hf_reference(tiny_model, catalog, batch, 4, 1.0, renormalize=mask == "before"))


def test_preamble_reused_across_batches_and_recomputed_when_weights_change(tiny_model, catalog, make_batch_fn):
    import copy

    model = copy.deepcopy(tiny_model)
    dec = ConstrainedBeamSearch(catalog, num_beams=4, top_k=[1])
    inference = CausalLMInference(preamble_ids=preamble_ids(make_batch_fn))
    rank(dec, model, make_batch_fn(PROMPTS), inference)
    kv = inference.preamble[2]
    rank(dec, model, make_batch_fn(OTHERS), inference)
    assert inference.preamble[2] is kv  # the second batch reused the first one's preamble KV
    with torch.no_grad():  # an optimiser-like in-place update of one weight
        model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
    got = rank(dec, model, make_batch_fn(OTHERS), inference)
    assert inference.preamble[2] is not kv
    assert_same(got, rank(ConstrainedBeamSearch(catalog, num_beams=4, top_k=[1], share_preamble=False),
                          model, make_batch_fn(OTHERS)))


def test_preamble_length_rules():
    preamble = np.array([5, 6, 7, 8, 9, 10, 11, 12, 13])
    user = np.array([5, 6, 7, 8, 9, 10, 11, 12, 13, 20, 21, 22])
    assert preamble_len(user, preamble) == 9  # the whole preamble, then the user's own tokens
    assert preamble_len(user, None) == 0
    other = user.copy()
    other[5] = 99  # shares only 5..9 with the preamble: too short to be worth it
    assert preamble_len(other, preamble) == 0
    assert preamble_len(preamble.copy(), preamble) == 8  # one token left for the user's own last position
    longer = np.concatenate([preamble, [30, 31]])
    assert preamble_len(user, longer) == 9  # a user that shares part of it starts from that part


def test_preamble_split_depends_on_the_user_alone(tiny_model, catalog, make_batch_fn):
    """A user's target_logp is bit-identical whichever users share its batch: the split into preamble +
    own tokens comes from the data's fixed preamble, not from the batch's common start (with the old
    batch rule, user 0 alone was split after its second-to-last token, beside a partner after the
    longer common start). Beam scores are batched across users' rows: equal to float32 rounding."""
    pre = preamble_ids(make_batch_fn)
    dec = ConstrainedBeamSearch(catalog, num_beams=4, top_k=[1])
    targets = [catalog.seq_items[0][0], catalog.seq_items[1][0]]
    alone = BatchPredictor(dec, catalog, {"target_logp": True}, pre).predict(
        tiny_model, make_batch_fn(PROMPTS[:1], targets[:1]))
    together = BatchPredictor(dec, catalog, {"target_logp": True}, pre).predict(
        tiny_model, make_batch_fn([PROMPTS[0], PREAMBLE + "hello there b"], targets))
    assert alone[0]["target_logp"] == together[0]["target_logp"]
    assert alone[0]["ranked_ids"] == together[0]["ranked_ids"]
    assert alone[0]["scores"] == pytest.approx(together[0]["scores"], abs=1e-6)


def test_bf16_decoding_leaves_the_model_fp32_and_agrees_with_fp32(tiny_model, catalog, make_batch_fn):
    batch = make_batch_fn(PROMPTS)
    fp32 = rank(ConstrainedBeamSearch(catalog, num_beams=5, top_k=[1, 5]), tiny_model, batch)
    dec = ConstrainedBeamSearch(catalog, num_beams=5, top_k=[1, 5], dtype="bfloat16")
    inference = CausalLMInference(dec.dtype)
    bf16 = rank(dec, tiny_model, batch, inference)
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())
    assert next(inference.copies.held(torch.bfloat16).parameters()).dtype == torch.bfloat16
    assert dec.compute_dtype == inference.compute_dtype == "bfloat16"
    for a, b in zip(fp32, bf16):
        assert {s for s, _ in a} == {s for s, _ in b}
        assert a[0][0] == b[0][0]
        assert [sc for _, sc in b] == pytest.approx([sc for _, sc in a], abs=0.2)
    assert [sc for r in bf16 for _, sc in r] != [sc for r in fp32 for _, sc in r]  # bf16 really ran


@pytest.mark.parametrize("name", ["cbs", "cbs_masked"])
def test_decoder_configs_ask_for_float32_and_auto_or_bad_dtype_is_refused(catalog, name, tmp_path):
    """Metrics are computed in float32 on every machine: the configs say so, the decoder reports it,
    and ``auto`` (bf16 where native, so machine-dependent) is refused with a message naming the fix."""
    from omegaconf import OmegaConf

    from tests.conftest import compose

    cfg = compose("eval.yaml", ["backbone=tiny_llama", f"decoder={name}"], tmp_path).decoder  # as a run composes it
    dec = build_decoder(cfg, catalog)
    assert cfg.dtype == "float32" and dec.compute_dtype == "float32" and dec.share_preamble
    assert build_decoder({**OmegaConf.to_container(cfg), "dtype": "bfloat16"}, catalog).compute_dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"decoder.dtype=auto .*decoder.dtype=float32.*decoder.dtype=bfloat16"):
        ConstrainedBeamSearch(catalog, dtype="auto")
    with pytest.raises(ValueError, match="decoder.dtype"):
        ConstrainedBeamSearch(catalog, dtype="float16")
