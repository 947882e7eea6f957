"""The sensitive signal (msl_rec/decoding/scoring.py) against a brute-force computation: full
logits at every position of prompt + response, a dense valid-token mask built by hand."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tiny():
    """The tiny random LLaMA and a 6-title catalog with shared prefixes (SmolLM2 tokenizer)."""
    from omegaconf import OmegaConf

    from msl_rec.data.catalog import ItemCatalog
    from msl_rec.models.backbone import build_backbone
    from msl_rec.models.tokenizers import load_tokenizer
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


@pytest.mark.parametrize("mask", ["before", "after"])
def test_target_logp_and_sampled_rank_equal_brute_force(tiny, mask):
    from msl_rec.decoding.scoring import TargetScorer

    model, catalog, tok = tiny
    batch, encs = _batch(catalog, tok, ["Recommend a book after Emma", "Hi"], [2, 3])
    scorer = TargetScorer(catalog, mask=mask, num_negatives=3, seed=1, chunk_size=2)
    got = scorer.score(model, batch)
    for g, e in zip(got, encs):
        want = _brute_logp(model, catalog, e.prompt_ids, e.sample.target, mask)
        assert g["target_logp"] == pytest.approx(want, abs=1e-4)
        negs = scorer.negatives(e.sample.user_id, e.sample.target)
        assert len(set(negs)) == 3 and catalog.item_seq[e.sample.target] not in negs
        neg_logps = [_brute_logp(model, catalog, e.prompt_ids, catalog.seq_items[s][0], mask) for s in negs]
        assert g["sampled_rank"] == sum(x >= want for x in neg_logps)
        assert g["sampled_negatives"] == 3
    # masked scoring renormalises over fewer tokens: never below the full-vocabulary value
    if mask == "before":
        full = TargetScorer(catalog, mask="after", num_negatives=0).score(model, batch)
        assert all(b["target_logp"] >= a["target_logp"] - 1e-5 for a, b in zip(full, got))
        assert all("sampled_rank" not in r for r in full)


def test_summarize_and_empty(tiny):
    from msl_rec.decoding import summarize

    preds = [{"rank": 0, "target_logp": -1.0, "sampled_rank": 0}, {"rank": -1, "target_logp": -3.0, "sampled_rank": 3}]
    m = summarize(preds, (1,))
    assert m["target_logp"] == -2.0 and m["target_rank_sampled"] == 1.5 and m["mrr_sampled"] == (1 + 0.25) / 2
    with pytest.raises(ValueError, match="n=0"):
        summarize([], (1,))
