"""The decoding speed paths give the fp32 full-prompt results: the shared preamble (computed once,
reused, invalidated when the weights change) and bf16 decoding through a frozen copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msl_rec.decoding import ConstrainedBeamSearch, build_decoder
from tests.decoding.test_beam_exact import hf_reference

PREAMBLE = "below is an instruction "  # 24 char tokens shared by every prompt, as the Alpaca header is
PROMPTS = [PREAMBLE + p for p in ["hello there a", "my books", "i read dune and emma then"]]
OTHERS = [PREAMBLE + p for p in ["go home", "kites and hats"]]


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
    got = fast.rank(tiny_model, batch)
    assert fast._preamble is not None and len(fast._preamble[1]) == len(PREAMBLE)  # it really was shared
    assert plain._preamble is None
    assert_same(got, plain.rank(tiny_model, batch))
    assert_same(got, hf_reference(tiny_model, catalog, batch, 4, 1.0, renormalize=mask == "before"))


def test_preamble_reused_across_batches_and_recomputed_when_weights_change(tiny_model, catalog, make_batch_fn):
    import copy

    model = copy.deepcopy(tiny_model)
    dec = ConstrainedBeamSearch(catalog, num_beams=4, top_k=[1])
    dec.rank(model, make_batch_fn(PROMPTS))
    kv = dec._preamble[2]
    dec.rank(model, make_batch_fn(OTHERS))
    assert dec._preamble[2] is kv  # the second batch reused the first one's preamble KV
    with torch.no_grad():  # an optimiser-like in-place update of one weight
        model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
    got = dec.rank(model, make_batch_fn(OTHERS))
    assert dec._preamble[2] is not kv
    assert_same(got, ConstrainedBeamSearch(catalog, num_beams=4, top_k=[1], share_preamble=False)
                .rank(model, make_batch_fn(OTHERS)))


def test_preamble_length_rules(catalog):
    dec = ConstrainedBeamSearch(catalog, num_beams=2, top_k=[1])
    ids = np.array([[0, 0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
                    [5, 6, 7, 8, 9, 10, 11, 12, 13, 20, 21, 22]])
    attn = (ids > 0).astype(np.int64)
    assert dec._preamble_len(ids, attn) == 9  # the common start 5..13
    short = ids.copy()
    short[1, 7] = 99  # common start 5..9 only: too short to be worth it
    assert dec._preamble_len(short, attn) == 0
    same = np.array([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]] * 2)
    assert dec._preamble_len(same, np.ones_like(same)) == 9  # one token left per user for its logits
    assert dec._preamble_len(ids[:, ::-1].copy(), attn[:, ::-1].copy()) == 0  # right-padded: never shared


def test_bf16_decoding_leaves_the_model_fp32_and_agrees_with_fp32(tiny_model, catalog, make_batch_fn):
    batch = make_batch_fn(PROMPTS)
    fp32 = ConstrainedBeamSearch(catalog, num_beams=5, top_k=[1, 5]).rank(tiny_model, batch)
    dec = ConstrainedBeamSearch(catalog, num_beams=5, top_k=[1, 5], dtype="bfloat16")
    bf16 = dec.rank(tiny_model, batch)
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())
    assert next(dec.copies.held(torch.bfloat16).parameters()).dtype == torch.bfloat16
    assert dec.compute_dtype == "bfloat16"
    for a, b in zip(fp32, bf16):
        assert {s for s, _ in a} == {s for s, _ in b}
        assert a[0][0] == b[0][0]
        assert [sc for _, sc in b] == pytest.approx([sc for _, sc in a], abs=0.2)
    assert [sc for r in bf16 for _, sc in r] != [sc for r in fp32 for _, sc in r]  # bf16 really ran


@pytest.mark.parametrize("name", ["cbs", "cbs_masked"])
def test_decoder_configs_ask_for_float32_and_auto_or_bad_dtype_is_refused(catalog, name):
    """Metrics are computed in float32 on every machine: the configs say so, the decoder reports it,
    and ``auto`` (bf16 where native, so machine-dependent) is refused with a message naming the fix."""
    from omegaconf import OmegaConf

    from msl_rec.utils.config import CONFIG_DIR

    cfg = OmegaConf.load(f"{CONFIG_DIR}/decoder/{name}.yaml")
    dec = build_decoder(cfg, catalog)
    assert cfg.dtype == "float32" and dec.compute_dtype == "float32" and dec.share_preamble
    assert build_decoder({**OmegaConf.to_container(cfg), "dtype": "bfloat16"}, catalog).compute_dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"decoder.dtype=auto .*decoder.dtype=float32.*decoder.dtype=bfloat16"):
        ConstrainedBeamSearch(catalog, dtype="auto")
    with pytest.raises(ValueError, match="decoder.dtype"):
        ConstrainedBeamSearch(catalog, dtype="float16")
