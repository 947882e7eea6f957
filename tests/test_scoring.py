"""The sensitive signal (msl_rec/evaluation/scoring.py) against a brute-force computation: full
logits at every position of prompt + response, a dense valid-token mask built by hand."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tiny():
    """The tiny random LLaMA and a 6-title catalog with shared prefixes (SmolLM2 tokenizer)."""
    from omegaconf import OmegaConf

    from msl_rec.data.catalog import ItemCatalog
    from msl_rec.data.tokenizers import load_tokenizer
    from msl_rec.models.backbone import build_backbone
    from msl_rec.utils.config import CONFIG_DIR

    cfg = OmegaConf.to_container(OmegaConf.load(f"{CONFIG_DIR}/backbone/tiny_llama.yaml"), resolve=True)
    tok = load_tokenizer(cfg["tokenizer"])
    titles = {1: "The Hobbit", 2: "The Hobbit and more", 3: "Dune", 4: "Dune Messiah", 5: "Emma", 6: "The Road"}
    catalog = ItemCatalog(titles, tok)
    torch.manual_seed(0)
    model = build_backbone(cfg).eval()
    with torch.no_grad():  # LoRA B is 0 at init: perturb it so the adapter path counts too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return model, catalog, tok


def _batch(catalog, tok, prompts: list[str], targets: list[int]):
    """A batch in the datamodule's contract (left padding) for the given prompts and targets."""
    from msl_rec.data.datamodule import Collator, EncodedSample
    from msl_rec.data.io import Sample

    encs = [EncodedSample(Sample(user_id=u, history=(), target=t, timestamp=0), tok(p, add_special_tokens=False)["input_ids"],
                          catalog.response_ids(t)) for u, (p, t) in enumerate(zip(prompts, targets))]
    return Collator(catalog, catalog.eos_id)([{"enc": e} for e in encs]), encs


def _brute_logp(model, catalog, prompt_ids: list[int], item: int, mask: str) -> float:
    resp = catalog.response_ids(item)
    ids = torch.tensor([prompt_ids + resp])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()  # (T, V) at EVERY position
    total = 0.0
    for p, tok_id in enumerate(resp):
        row = logits[len(prompt_ids) + p - 1]
        if mask == "before":
            dense = torch.full_like(row, float("-inf"))
            allowed = catalog.allowed(resp[:p])
            dense[allowed] = row[allowed]
            row = dense
        total += float(torch.log_softmax(row, -1)[tok_id])
    return total


def _predictor(catalog, mask: str, tok=None, **scoring):
    """A predictor as evaluation builds one; with ``tok``, HEADER's tokens are the data's shared preamble."""
    from msl_rec.decoding import ConstrainedBeamSearch
    from msl_rec.evaluation.predict import BatchPredictor

    decoder = ConstrainedBeamSearch(catalog, num_beams=2, mask=mask, top_k=[1], max_new_tokens=8)
    preamble = tok(HEADER, add_special_tokens=False)["input_ids"] if tok is not None else None
    return BatchPredictor(decoder, catalog, scoring, preamble)


HEADER = "Below is an instruction that describes a task. Write a response that completes the request. "
PROMPTS = [HEADER + p for p in ["Recommend a book after Emma and The Road, please.", "Hi", "Dune then what?"]]


@pytest.mark.parametrize("mask", ["before", "after"])
def test_target_logp_from_the_beam_search_prompt_kv_equals_a_full_forward(tiny, mask):
    """target_logp continues the prompt KV the beam search computed (shared preamble, per-user prompts)
    and equals a brute-force forward of prompt + response with a full / valid-set softmax at every
    position, within 1e-5, whatever the batch size."""
    model, catalog, tok = tiny
    batch, encs = _batch(catalog, tok, PROMPTS, [2, 3, 6])
    predictor = _predictor(catalog, mask, tok)
    got = predictor.predict(model, batch)
    want = [_brute_logp(model, catalog, e.prompt_ids, e.sample.target, mask) for e in encs]
    assert [r["target_logp"] for r in got] == pytest.approx(want, abs=1e-5)
    assert predictor.inference.preamble is not None  # the prompts really went through the shared preamble
    assert all("sampled_rank" not in r for r in got) and predictor.num_negatives == 0  # off by default
    alone = [predictor.predict(model, _batch(catalog, tok, [p], [t])[0])[0]["target_logp"]
             for p, t in zip(PROMPTS, [2, 3, 6])]
    assert alone == [r["target_logp"] for r in got]  # one user per forward: bit-identical across batch sizes
    if mask == "before":  # renormalised over fewer tokens: never below the full-vocabulary value
        full = _predictor(catalog, "after").predict(model, batch)
        assert all(b["target_logp"] >= a["target_logp"] - 1e-5 for a, b in zip(full, got))


def test_each_prompt_is_run_once_per_user(tiny, monkeypatch):
    """One prompt forward per user in all: beam search, target_logp and the sampled rank share it."""
    from msl_rec.models.inference import preamble_len

    model, catalog, tok = tiny
    batch, _ = _batch(catalog, tok, PROMPTS, [2, 3, 6])
    predictor = _predictor(catalog, "before", tok, num_negatives=3)
    predictor.predict(model, batch)  # the shared preamble is computed once, on the first batch
    body = model.get_base_model().model
    starts = []  # (first position id, tokens) of every forward
    forward = body.forward
    monkeypatch.setattr(body, "forward", lambda *a, **k: starts.append(
        (int(k["position_ids"][0, 0]), k["input_ids"].shape[1])) or forward(*a, **k))
    predictor.predict(model, batch)
    preamble = predictor.inference.preamble_ids
    users = [batch["prompt_input_ids"][b][m.bool()].numpy() for b, m in enumerate(batch["prompt_attention_mask"])]
    # each user's prompt forward starts right after its share of the preamble and runs its own tokens; every
    # other forward (beam steps, responses) starts after a whole prompt
    want = sorted((preamble_len(u, preamble), len(u) - preamble_len(u, preamble)) for u in users)
    assert all(n > 0 for n, _ in want)  # the preamble really was shared
    shortest = min(map(len, users))  # a prompt forward starts before the end of every prompt
    assert sorted(s for s in starts if s[0] < shortest) == want and len(starts) > len(PROMPTS)


@pytest.mark.parametrize("mask", ["before", "after"])
def test_batched_sampled_rank_equals_per_user_brute_force(tiny, mask):
    from msl_rec.evaluation.scoring import sample_negatives

    model, catalog, tok = tiny
    batch, encs = _batch(catalog, tok, PROMPTS, [2, 3, 6])
    # chunk_size 4: candidates of different users share a forward
    got = _predictor(catalog, mask, num_negatives=3, seed=1, chunk_size=4).predict(model, batch)
    for g, e in zip(got, encs):
        want = _brute_logp(model, catalog, e.prompt_ids, e.sample.target, mask)
        negs = sample_negatives(catalog, 3, 1, e.sample.user_id, e.sample.target)
        assert len(set(negs)) == 3 and catalog.item_seq[e.sample.target] not in negs
        neg_logps = [_brute_logp(model, catalog, e.prompt_ids, catalog.seq_items[s][0], mask) for s in negs]
        assert min(abs(x - want) for x in neg_logps) > 1e-4  # no near-tie: the brute-force rank is exact
        assert g["sampled_rank"] == sum(x >= want for x in neg_logps)
        assert g["sampled_negatives"] == 3


def test_scoring_settings_are_checked(tiny):
    from msl_rec.evaluation.scoring import ScoringSettings

    assert ScoringSettings.from_config(None) == ScoringSettings(True, 0, 0, 32)
    with pytest.raises(ValueError, match="scoring: unknown key"):
        ScoringSettings.from_config({"num_negativs": 3})
    with pytest.raises(ValueError, match=r"scoring.num_negatives=-1"):
        ScoringSettings.from_config({"num_negatives": -1})
    with pytest.raises(ValueError, match=r"scoring.chunk_size=0"):
        ScoringSettings.from_config({"chunk_size": 0})


def test_summarize_and_empty(tiny):
    from msl_rec.evaluation import summarize

    preds = [{"rank": 0, "target_logp": -1.0, "sampled_rank": 0}, {"rank": -1, "target_logp": -3.0, "sampled_rank": 3}]
    m = summarize(preds, (1,))
    assert m["target_logp"] == -2.0 and m["target_rank_sampled"] == 1.5 and m["mrr_sampled"] == (1 + 0.25) / 2
    with pytest.raises(ValueError, match="n=0"):
        summarize([], (1,))
