"""BIGRec's grounding decoder (msl_rec/decoding/grounding.py) against transformers' ``generate`` and a
brute-force nearest-title search; its invariances, its title-embedding cache and the eval app."""

from __future__ import annotations

import contextlib
import copy
import json

import pytest
import torch

from msl_rec.decoding import Grounding, build_decoder
from msl_rec.evaluation.predict import BatchPredictor
from msl_rec.models.inference import CausalLMInference, LMRunner

TITLES = {1: "The Hobbit", 2: "The Hobbit and more", 3: "Dune", 4: "Dune Messiah", 5: "Emma", 6: "The Road",
          7: "Persuasion", 8: "Children of Dune", 9: "The Road Home", 10: "Emma: A Novel", 11: "Dune Messiah"}
HEADER = "Below is an instruction that describes a task. Write a response that completes the request. "
PROMPTS = [HEADER + p for p in ["Recommend a book after Emma and The Road, please.", "Hi", "Dune then what?",
                                "I read The Hobbit twice"]]


@pytest.fixture(scope="module")
def tiny():
    """The tiny LLaMA (SmolLM2 tokenizer) with a non-zero LoRA adapter, logits sharpened (the output
    layer, untied, x 20: no near-ties among beam candidates) and EOS made likely enough that some beams end
    early and others run to max_new_tokens; an 11-title catalog (one duplicate title)."""
    from omegaconf import OmegaConf

    from msl_rec.data.catalog import ItemCatalog
    from msl_rec.data.tokenizers import load_tokenizer
    from msl_rec.models.backbone import build_backbone
    from msl_rec.utils.config import CONFIG_DIR

    cfg = OmegaConf.to_container(OmegaConf.load(f"{CONFIG_DIR}/backbone/tiny_llama.yaml"), resolve=True)
    tok = load_tokenizer(cfg["tokenizer"])
    catalog = ItemCatalog(TITLES, tok)
    torch.manual_seed(0)
    model = build_backbone(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # LoRA B is 0 at init: the adapter must change the model for base vs tuned
                p.normal_(0, 0.5)
        head = model.get_base_model().get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight * 20.0, requires_grad=False)  # untied: inputs keep their scale
        # EOS's output row along the prompts' mean final hidden state: EOS wins for some beams, not all
        batch = _batch(tok, PROMPTS)
        real = batch["prompt_attention_mask"].bool()
        hidden = model.get_base_model().model(input_ids=batch["prompt_input_ids"],
                                              attention_mask=batch["prompt_attention_mask"]).last_hidden_state[real]
        head.weight[catalog.eos_id] = 1.9 * hidden.mean(0) / hidden.mean(0).norm()
    return model, catalog, tok


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ids(tok, prompts):
    return [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]


def _batch(tok, prompts, targets=None):
    """A left-padded batch in the data module's layout."""
    ids = _ids(tok, prompts)
    width = max(map(len, ids))
    n = len(ids)
    return {"prompt_input_ids": torch.tensor([[0] * (width - len(i)) + i for i in ids]),
            "prompt_attention_mask": torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids]),
            "target_ids": torch.tensor(targets or [1] * n), "user_ids": torch.arange(n)}


def _encoded(lm, tok, prompts):
    batch = _batch(tok, prompts)
    return lm.encode_prompts(batch["prompt_input_ids"], batch["prompt_attention_mask"])


def _brute_embedding(model, tokens, base: bool) -> torch.Tensor:
    """BIGRec's embedding (``hidden_states[-1][:, -1, :]``) of one text run alone through the whole model."""
    with torch.no_grad(), (model.disable_adapter() if base else contextlib.nullcontext()):
        out = model(input_ids=torch.tensor([list(tokens)]), output_hidden_states=True)
    return out.hidden_states[-1][0, -1].float()


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping,cut_off",
                         [(4, 1.0, False, True), (3, 0.0, "never", False),
                          *(pytest.param(*p, marks=pytest.mark.slow) for p in [(5, 2.0, True, False),
                                                                                 (2, -0.5, False, False),
                                                                                 (6, 1.0, "never", True)])])
def test_free_beam_search_equals_transformers_generate(tiny, num_beams, length_penalty, early_stopping, cut_off):
    """Every user's finished hypotheses (sequences, scores to 1e-4) equal ``generate(num_beams=K,
    num_return_sequences=K, do_sample=False)`` on the user's unpadded prompt, EOS-ended and cut-off ones."""
    model, catalog, tok = tiny
    max_new = 10
    dec = Grounding(catalog, num_beams=num_beams, length_penalty=length_penalty, max_new_tokens=max_new,
                    early_stopping=early_stopping, top_k=[1])
    lm = CausalLMInference().bind(model)
    got = dec.generate(lm, _encoded(lm, tok, PROMPTS))
    lengths = []
    for ids, hyps in zip(_ids(tok, PROMPTS), got):
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             num_beams=num_beams, num_return_sequences=num_beams, do_sample=False,
                             max_new_tokens=max_new, eos_token_id=catalog.eos_id, pad_token_id=catalog.eos_id,
                             length_penalty=length_penalty, early_stopping=early_stopping,
                             output_scores=True, return_dict_in_generate=True)
        want = []
        for seq, score in zip(out.sequences[:, len(ids):].tolist(), out.sequences_scores.tolist()):
            want.append((score, seq[: seq.index(catalog.eos_id) + 1] if catalog.eos_id in seq else seq))
        assert [s for _, s in hyps] == [s for _, s in want]
        assert [x for x, _ in hyps] == pytest.approx([x for x, _ in want], abs=1e-4)
        lengths += [len(s) for _, s in hyps]
    assert min(lengths) < max_new  # hypotheses ended by EOS were compared ...
    assert (max(lengths) == max_new) == cut_off  # ... and, where the search ran that long, cut-off ones


@pytest.mark.parametrize("embedding_model", ["base", "tuned"])
def test_ranking_equals_brute_force_nearest_title(tiny, embedding_model):
    """Every catalog sequence ranked by the L2 distance (1e-5) of its title run alone through the model
    (adapter off for ``base``) to the generated text's embedding; the same order as a stable argsort."""
    model, catalog, tok = tiny
    n = len(catalog.sequences)
    dec = Grounding(catalog, num_beams=4, max_new_tokens=10, num_results=n, embedding_model=embedding_model,
                    top_k=[1, 5], text="response")
    lm = CausalLMInference().bind(model)
    prompts = _encoded(lm, tok, PROMPTS)
    generated = [hyps[0][1] for hyps in dec.generate(lm, prompts)]
    got = dec.search(lm, prompts)
    base = embedding_model == "base"
    titles = torch.stack([_brute_embedding(model, seq[:-1], base) for seq in catalog.sequences])
    for text, ranking in zip(generated, got):
        text = text[:-1] if text[-1] == catalog.eos_id and len(text) > 1 else text  # BIGRec: EOS not embedded
        dist = (titles - _brute_embedding(model, text, base)).norm(dim=-1)
        order = torch.sort(dist, stable=True).indices.tolist()
        assert [s for s, _ in ranking] == order
        assert [-x for _, x in ranking] == pytest.approx(dist[order].tolist(), abs=1e-5)
        gaps = torch.diff(dist[order])
        assert float(gaps.min()) > 1e-4  # no near-tie: the brute-force order is exact
    other = Grounding(catalog, num_beams=4, max_new_tokens=10, num_results=n, top_k=[1], text="response",
                      embedding_model="tuned" if base else "base").search(lm, prompts)
    assert [[x for _, x in r] for r in other] != [[x for _, x in r] for r in got]  # the adapter matters


def test_bigrec_texts_are_bare_titles_with_the_tokenizers_special_tokens(tiny):
    """``text="title"`` (the default, BIGRec's): every title embedded as ``tokenizer(title)`` (quotes and spaces
    stripped, special tokens added) and each generation as ``tokenizer(decode(generated).strip('"'))``; the
    ranking equals a brute-force nearest-title search over those texts."""
    model, catalog, tok = tiny
    n = len(catalog.sequences)
    dec = Grounding(catalog, num_beams=4, max_new_tokens=10, num_results=n, top_k=[1, 5])
    assert dec.text == "title"
    bare = [tok(catalog.titles[items[0]].strip(" ").strip('"'))["input_ids"] for items in catalog.seq_items]
    assert dec.titles == bare and all(b[-1] != ord('"') for b in bare)
    lm = CausalLMInference().bind(model)
    prompts = _encoded(lm, tok, PROMPTS)
    generated = [hyps[0][1] for hyps in dec.generate(lm, prompts)]
    titles = torch.stack([_brute_embedding(model, t, True) for t in bare])
    for g, ranking in zip(generated, dec.search(lm, prompts)):
        text = tok(tok.decode(g, skip_special_tokens=True).strip('"') or " ")["input_ids"]  # nothing left: a space
        dist = (titles - _brute_embedding(model, text, True)).norm(dim=-1)
        order = torch.sort(dist, stable=True).indices.tolist()
        assert [s for s, _ in ranking] == order
        assert [-x for _, x in ranking] == pytest.approx(dist[order].tolist(), abs=1e-5)
    response = Grounding(catalog, num_beams=4, max_new_tokens=10, num_results=n, top_k=[1], text="response")
    assert [[x for _, x in r] for r in response.search(lm, prompts)] != [[x for _, x in r] for r in
                                                                         dec.search(lm, prompts)]


def test_a_generated_title_is_its_own_nearest_title(tiny):
    """A generated text that is a title's response (EOS included) is at distance 0 from that title."""
    model, catalog, _ = tiny
    dec = Grounding(catalog, num_beams=2, max_new_tokens=10, top_k=[1, 3])
    lm = CausalLMInference().bind(model)
    for s in (0, 3, len(catalog.sequences) - 1):
        (ranking,) = dec.ground(lm, [catalog.sequences[s]])
        # the title was embedded in a batch of titles of its length, the generation alone: rounding apart
        assert ranking[0][0] == s and abs(ranking[0][1]) < 1e-5 and len(ranking) == 3


def test_rankings_do_not_depend_on_the_batch(tiny):
    """Users ranked in batches of 1 and of 3 (the shared preamble on, as evaluation runs) give identical lists."""
    model, catalog, tok = tiny
    dec = Grounding(catalog, num_beams=4, max_new_tokens=10, top_k=[1, 5], num_results=8)
    preamble = tok(HEADER, add_special_tokens=False)["input_ids"]
    batched = BatchPredictor(dec, catalog, {"target_logp": False}, preamble)
    alone = BatchPredictor(dec, catalog, {"target_logp": False}, preamble)
    threes = [r for lo in (0, 3) for r in batched.predict(model, _batch(tok, PROMPTS[lo: lo + 3]))]
    ones = [alone.predict(model, _batch(tok, [p]))[0] for p in PROMPTS]
    for a, b in zip(threes, ones):
        assert (a["ranked_ids"], a["scores"]) == (b["ranked_ids"], b["scores"])
    assert batched.inference.preamble is not None  # the prompts did share the preamble's KV


def test_rankings_are_the_same_at_one_and_two_threads(tiny):
    """The same lists; distances within 1e-5 (a CPU matmul's sums depend on the thread count, ~1e-7)."""
    model, catalog, tok = tiny
    dec = Grounding(catalog, num_beams=4, max_new_tokens=10, top_k=[1], num_results=len(catalog.sequences))
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        runs.append(dec.rank(CausalLMInference().bind(model), _batch(tok, PROMPTS)))
    torch.set_num_threads(1)
    for one, two in zip(*runs):
        assert [s for s, _ in one] == [s for s, _ in two]
        assert [x for _, x in one] == pytest.approx([x for _, x in two], abs=1e-5)


@pytest.mark.parametrize("embedding_model", ["tuned", "base"])
def test_title_embeddings_are_cached_per_weights_version(tiny, monkeypatch, embedding_model):
    """The titles are embedded once across batches, again after the weights they are embedded with change
    (a LoRA weight for ``tuned``; a backbone weight for ``base``, which a LoRA edit leaves cached), and the
    cached embeddings equal fresh ones."""
    model, catalog, tok = tiny
    model = copy.deepcopy(model)  # edited below
    dec = Grounding(catalog, num_beams=3, max_new_tokens=6, top_k=[1], embedding_model=embedding_model)
    inference = CausalLMInference()
    computed = []  # cache_key of every text_embeddings call that ran the model
    calls = []
    embed, body = LMRunner.text_embeddings, LMRunner._embedding_body
    monkeypatch.setattr(LMRunner, "text_embeddings", lambda self, texts, **kw: calls.append(kw.get("cache_key"))
                        or embed(self, texts, **kw))
    monkeypatch.setattr(LMRunner, "_embedding_body", lambda self, base: computed.append(calls[-1]) or body(self, base))
    base = embedding_model == "base"

    def run(prompts) -> torch.Tensor:
        computed.clear()
        dec.rank(inference.bind(model), _batch(tok, prompts))
        return inference.text_cache[("catalog titles", base)][2]

    def fresh() -> torch.Tensor:
        return CausalLMInference().bind(model).text_embeddings(dec.titles, base=base)

    first = run(PROMPTS[:2])
    assert computed == ["catalog titles", None]  # the titles, then the two generated texts
    second = run(PROMPTS[2:])
    assert computed == [None] and second is first
    assert torch.equal(first, fresh())

    lora = next(p for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora.add_(0.3)
    after_lora = run(PROMPTS[:1])
    if base:  # the backbone's own weights did not change
        assert computed == [None] and after_lora is first
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "q_proj.base_layer" in n).mul_(1.5)
        after_base = run(PROMPTS[:1])
        assert computed == ["catalog titles", None] and not torch.allclose(after_base, first)
        assert torch.equal(after_base, fresh())
    else:
        assert computed == ["catalog titles", None] and not torch.allclose(after_lora, first)
        assert torch.equal(after_lora, fresh())


def test_base_embeddings_through_a_dtype_copy(tiny):
    """A bfloat16 model decoded in float32 runs through a float32 copy; ``base`` then embeds with an
    adapter-free copy: the backbone's own weights, as the adapter switched off on the model itself."""
    model, catalog, _ = tiny
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    texts = [seq[:-1] for seq in catalog.sequences]
    inference = CausalLMInference("float32")
    got = inference.bind(bf16).text_embeddings(texts, base=True)
    assert inference.copies.held(torch.float32, adapter=False) is not None
    reference = copy.deepcopy(bf16).float()
    want = torch.stack([_brute_embedding(reference, t, base=True) for t in texts])
    assert torch.allclose(got, want, atol=1e-5)
    tuned = inference.bind(bf16).text_embeddings(texts)
    assert not torch.allclose(tuned, got, atol=1e-3)


def test_target_logp_is_the_full_softmax_one(tiny):
    """Grounding generates from the full softmax: its target_logp is cbs's (unmasked), not cbs_masked's."""
    from msl_rec.decoding import ConstrainedBeamSearch

    model, catalog, tok = tiny
    batch = _batch(tok, PROMPTS[:3], targets=[2, 3, 6])
    rows = {name: BatchPredictor(dec, catalog, {"target_logp": True}).predict(model, batch)
            for name, dec in [("grounding", Grounding(catalog, num_beams=2, max_new_tokens=4, top_k=[1])),
                              ("after", ConstrainedBeamSearch(catalog, num_beams=2, mask="after", top_k=[1])),
                              ("before", ConstrainedBeamSearch(catalog, num_beams=2, mask="before", top_k=[1]))]}
    logp = {name: [r["target_logp"] for r in got] for name, got in rows.items()}
    assert logp["grounding"] == logp["after"] and logp["grounding"] != logp["before"]


def test_build_decoder_checks_the_settings(tiny):
    from omegaconf import OmegaConf

    from msl_rec.decoding import max_response_len
    from msl_rec.utils.config import CONFIG_DIR

    _, catalog, _ = tiny
    cfg = OmegaConf.to_container(OmegaConf.load(f"{CONFIG_DIR}/decoder/grounding.yaml"))
    cfg.pop("defaults")
    assert cfg.pop("embedding_cache") == "${paths.log_dir}/cache/title_embeddings"  # resolved when composed
    dec = build_decoder(cfg, catalog, top_k=[1, 5])
    assert isinstance(dec, Grounding) and dec.max_new_tokens == max_response_len(catalog)
    assert dec.num_results == 5 and dec.num_beams == 10 and dec.embedding_model == "base"
    assert dec.mask == "after" and dec.compute_dtype == "float32"
    with pytest.raises(ValueError, match="num_results=3"):
        build_decoder({**cfg, "num_results": 3}, catalog, top_k=[1, 5])
    with pytest.raises(ValueError, match="decoder.dtype=auto"):
        build_decoder({**cfg, "dtype": "auto"}, catalog)
    with pytest.raises(ValueError, match="decoder.embedding_model"):
        Grounding(catalog, embedding_model="lora")
    with pytest.raises(ValueError, match="num_results=99"):
        Grounding(catalog, num_results=99)  # more than the catalog's 10 distinct titles


def test_eval_app_with_grounding(compose_eval, tmp_path):
    """``msl-rec-eval decoder=grounding`` on the tiny backbone (zero-shot) writes predictions and metrics."""
    from msl_rec.eval import evaluate_app

    metrics, _ = evaluate_app(compose_eval("decoder=grounding", "subset=3", "decoder.num_beams=3"))
    assert set(metrics) >= {"valid/ndcg@10", "valid/hr@1"}
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["decoder"] == "grounding" and saved["dtype"] == "float32"
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert len(row["ranked_ids"]) == 10 and row["scores"] == sorted(row["scores"], reverse=True)
        assert all(s <= 0 for s in row["scores"]) and row["target_logp"] < 0


def test_title_embeddings_on_disk_are_reused_across_processes_and_keyed_by_weights(tiny, tmp_path):
    """``decoder.embedding_cache``: a new inference object (another process) reads the titles' embeddings from
    the folder instead of running the model; a corrupt file is recomputed; other weights get another file."""
    model, catalog, _ = tiny
    model = copy.deepcopy(model)  # edited below
    dec = Grounding(catalog, num_beams=3, max_new_tokens=6, top_k=[1], embedding_cache=str(tmp_path))

    def embed() -> tuple[torch.Tensor, int]:
        runner = CausalLMInference().bind(model)
        forwards = []
        hook = runner.body.register_forward_hook(lambda *a: forwards.append(1))
        try:
            out = runner.text_embeddings(dec.titles, base=True, cache_key="catalog titles", store=dec.embedding_cache)
        finally:
            hook.remove()
        return out, len(forwards)

    first, n = embed()
    files = list(tmp_path.glob("*.pt"))
    assert n > 0 and len(files) == 1
    again, n = embed()
    assert n == 0 and torch.equal(again, first)
    files[0].write_bytes(b"not a tensor")
    repaired, n = embed()
    assert n > 0 and torch.equal(repaired, first)
    with torch.no_grad():  # the adapter does not change base embeddings: the same file
        next(p for name, p in model.named_parameters() if "lora_B" in name).add_(0.3)
    assert embed()[1] == 0
    with torch.no_grad():
        next(p for name, p in model.named_parameters() if "q_proj.base_layer" in name).mul_(1.5)
    changed, n = embed()
    assert n > 0 and len(list(tmp_path.glob("*.pt"))) == 2 and not torch.allclose(changed, first)
