"""Hybrid methods (LLaRA, A-LLMRec): encoder slots in the prompt, checked against the released codes' way of
building ``inputs_embeds``; slots reach the logits (and text-only curriculum steps ignore them); checkpoints,
encoder checks, stage 1, curriculum and the train -> ``msl-rec-eval run_dir`` path of the shared pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from msl_rec.data.prompts import SlotPromptBuilder
from msl_rec.data.sequences import TitleCatalog
from msl_rec.eval import evaluate_app
from msl_rec.models.checkpoint import CheckpointError
from msl_rec.models.hybrid import SlotEmbedding, align_items, find_slots, hybrid_step
from msl_rec.models.inference import backbone_body, position_ids_from_mask
from msl_rec.models.sequential import SASRec
from msl_rec.train import train
from msl_rec.training.methods import check_method
from msl_rec.training.module import RecLitModule
from tests.conftest import TINY, compose

SEQ = ["trainer.num_sanity_val_steps=0", "data.micro_batch_size=32", "optim.global_batch_size=32",
       "data.eval_batch_size=16", "data.valid_subset=8", "top_k=[1,5,10]"]


def _save_config(cfg, run: Path) -> None:
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")  # what the Hydra app saves; run_dir= reads it


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory) -> Path:
    """A small `method=sasrec` run on Books (the encoder every hybrid test reads)."""
    run = tmp_path_factory.mktemp("sasrec")
    cfg = compose("train.yaml", TINY + SEQ + ["method=sasrec", "data.train_subset=256", "trainer.max_epochs=1"], run)
    train(cfg)
    _save_config(cfg, run)
    return run


def _hybrid(tmp_path: Path, encoder_run: Path, method: str, *overrides: str, name: str = "run"):
    run = tmp_path / name
    cfg = compose("train.yaml", TINY + [f"method={method}", f"method.encoder_run={encoder_run}",
                                        "trainer.max_epochs=1", "data.train_subset=6", "data.valid_subset=2",
                                        *overrides], run)
    metrics, objects = train(cfg)
    _save_config(cfg, run)
    return run, cfg, metrics, objects


@pytest.fixture(scope="module")
def llara_run(tmp_path_factory, encoder_run):
    return _hybrid(tmp_path_factory.mktemp("llara"), encoder_run, "llara", "loss=msl")


@pytest.fixture(scope="module")
def allmrec_run(tmp_path_factory, encoder_run):
    return _hybrid(tmp_path_factory.mktemp("allmrec"), encoder_run, "allmrec", "loss=lml")


def _batch(objects, n: int = 2):
    dm = objects["datamodule"]
    return next(iter(dm.eval_dataloader("valid", rows=range(n))))


def _logits(module: RecLitModule, batch) -> torch.Tensor:
    with torch.no_grad():
        return module(batch["input_ids"], batch["attention_mask"])


# ---------------------------------------------------------------------------- the prompt
def test_slot_prompt_puts_each_items_slot_after_its_title_and_the_user_slot_first(llara_run):
    objects = llara_run[3]
    dm = objects["datamodule"]
    tok, catalog = dm.tokenizer, dm.catalog
    index_of = TitleCatalog(catalog.titles).index_of
    base = len(tok)
    history = dm.split_samples("valid")[0].history
    for user in (False, True):
        b = SlotPromptBuilder.from_config(objects["cfg"].dataset, tok,
                                          catalog.titles, slot_base=base, index_of=index_of, user_slot=user)
        ids = b.build(history, 5)
        slots = [i - base for i in ids if i >= base]
        items = [index_of[i] for i in history[-len(slots) + user:]] if slots else []
        assert slots == ([len(index_of)] if user else []) + items, "one slot per kept history item, in order"
        # every slot id follows its item's title text: the text-only tokens between slots are the titles
        text = tok.decode([i for i in ids if i < base])
        for item in history[-len(items):]:
            assert f'"{catalog.titles[item]}"' in text
        pre = b.preamble_ids()
        assert ids[:len(pre)] == pre and all(i < base for i in pre)
        assert ids[len(pre)] >= base or not user  # A-LLMRec: the user slot opens the per-user part
    plain = b._encode(['no slot here'])[0]
    assert plain == list(tok(['no slot here'])["input_ids"][0])


def test_a_title_holding_the_slot_marker_is_refused(llara_run):
    dm = llara_run[3]["datamodule"]
    with pytest.raises(ValueError, match="U\\+E000"):
        SlotPromptBuilder(dm.tokenizer, {1: "bad \ue000 title"}, "i", "p", 64, slot_base=len(dm.tokenizer),
                          index_of={1: 0})


# ---------------------------------------------------------------------------- the slots reach the model
def _reference_hidden(module: RecLitModule, batch, item_vec) -> torch.Tensor:
    """LLaRA's wrap_emb: token embeddings with every slot position overwritten by its item's projected
    embedding, then the backbone on inputs_embeds."""
    slots = module.slots
    ids, mask = batch["input_ids"], batch["attention_mask"]
    emb = slots.weight[ids.clamp(max=slots.num_embeddings - 1)].clone()
    for b, t in (ids >= slots.slot_base).nonzero().tolist():
        emb[b, t] = item_vec(b, t, int(ids[b, t]) - slots.slot_base)
    body = backbone_body(module.model)
    out = body(inputs_embeds=emb, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
    return out.last_hidden_state


def test_llara_slots_equal_the_released_wrap_emb(llara_run):
    module, batch = llara_run[3]["model"].eval(), _batch(llara_run[3])
    slots = module.slots
    proj, enc = slots.parts["item_projector"], slots.parts["encoder"]
    with torch.no_grad():
        ref = _reference_hidden(module, batch, lambda b, t, i: proj(enc.item_embeddings.weight[i]))
        got = module.hidden_states(batch["input_ids"], batch["attention_mask"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], ref[real], rtol=0, atol=1e-5)


def test_allmrec_user_slot_is_the_encoders_user_state_of_the_history_after_it(allmrec_run):
    module, batch = allmrec_run[3]["model"].eval(), _batch(allmrec_run[3])
    slots = module.slots
    parts, enc = slots.parts, slots.parts["encoder"]
    ids = batch["input_ids"]

    def vec(b, t, i):
        if i < slots.num_items:
            return parts["item_projector"](parts["aligner"].fc1(enc.item_embeddings.weight[i]).sigmoid())
        hist = [int(x) - slots.slot_base for x in ids[b, t + 1:] if x >= slots.slot_base]
        state = enc.encode(torch.tensor([hist]), torch.tensor([len(hist)]))[0]
        return parts["user_projector"](state)

    with torch.no_grad():
        ref = _reference_hidden(module, batch, vec)
        got = module.hidden_states(ids, batch["attention_mask"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], ref[real], rtol=0, atol=1e-5)
    # per row: the same prompt alone gives the same states (the user slot reads its own row only)
    with torch.no_grad():
        alone = module.hidden_states(ids[1:], batch["attention_mask"][1:])
    torch.testing.assert_close(alone[real[1:]], got[1:][real[1:]], rtol=0, atol=1e-5)


@pytest.mark.parametrize("which", ["llara", "allmrec"])
def test_changing_an_items_encoder_embedding_changes_the_logits_and_text_only_steps_ignore_it(
        which, llara_run, allmrec_run):
    objects = (llara_run if which == "llara" else allmrec_run)[3]
    module, batch = objects["model"].eval(), _batch(objects, 1)
    slots = module.slots
    ids = batch["input_ids"][0]
    in_prompt = int(ids[ids >= slots.slot_base][-1]) - slots.slot_base
    absent = next(i for i in range(slots.num_items) if slots.slot_base + i not in ids.tolist())
    table = slots.parts["encoder"].item_embeddings.weight
    before = _logits(module, batch)
    text_before = None
    try:
        slots.use_items = False
        text_before = _logits(module, batch)
        slots.use_items = True
        with torch.no_grad():
            saved = table.clone()
            table[absent] += 1.0
        assert torch.equal(_logits(module, batch), before), "an item not in the prompt changes nothing"
        with torch.no_grad():
            table[in_prompt] += 1.0
        changed = _logits(module, batch)
        assert (changed - before).abs().max() > 1e-4, "a history item's SASRec embedding must reach the logits"
        slots.use_items = False
        assert torch.equal(_logits(module, batch), text_before), "text-only steps must ignore the embeddings"
    finally:
        slots.use_items = True
        with torch.no_grad():
            table.copy_(saved)


# ---------------------------------------------------------------------------- curriculum and stage 1
@pytest.mark.parametrize("fixture", ["llara_run", "allmrec_run"])
def test_a_users_slot_embeddings_do_not_depend_on_its_batch_mates(fixture, request):
    """Each row's slots equal, bit for bit, those of the row embedded alone: a product over the whole batch's
    slots rounds with the number of rows, which made scores depend on the evaluation batch size."""
    objects = request.getfixturevalue(fixture)[3]
    slots = find_slots(objects["model"].model)
    ids = _batch(objects, n=2)["input_ids"]
    rows = [ids[b:b + 1] for b in range(len(ids))]
    many = torch.cat(rows * 8)  # 16 rows: another kernel blocking than 1 row
    with torch.no_grad():
        together = slots(many)
        for b, row in enumerate(rows):
            alone = slots(row)[0]
            for copy in range(8):
                assert torch.equal(together[copy * len(rows) + b], alone), f"row {b}, copy {copy}"


@pytest.mark.parametrize("kind", ["llara", "allmrec"])
def test_slot_embeddings_do_not_depend_on_the_thread_count(kind):
    """Bit-equal slots on 1 and on 2 threads at SmolLM2's width (576) and SASRec's (64), with trained-sized weights:
    split over threads, the small products round differently (before: up to 4e-5 here, and a machine's core count
    moved A-LLMRec's target_logp by 1.3e-5)."""
    torch.manual_seed(0)
    vocab, items = 1000, 500
    slots = SlotEmbedding(torch.nn.Embedding(vocab, 576), SASRec(num_items=items), slot_base=vocab, kind=kind)
    ids = torch.randint(0, vocab, (16, 60))
    ids[:, 5:55:5] = vocab + torch.randint(0, items, (16, 10))
    if kind == "allmrec":
        ids[:, 3] = vocab + items  # the user slot, read from the items after it
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            for p in slots.parts.parameters():
                p.add_(torch.randn_like(p) * 0.5)
            torch.set_num_threads(1)
            one = slots(ids)
            torch.set_num_threads(2)
            two = slots(ids)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_llara_curriculum_grows_from_text_only_to_hybrid_and_is_a_function_of_the_step():
    total = 400
    draws = [hybrid_step(7, s, 0, total) for s in range(total)]
    assert draws == [hybrid_step(7, s, 0, total) for s in range(total)]  # resumable: same draws
    first, last = sum(draws[:100]) / 100, sum(draws[-100:]) / 100
    assert first < 0.3 and last > 0.7  # expected 0.125 and 0.875
    assert hybrid_step(7, total - 1, 0, total) is True  # p = 1 at the end


def test_train_hybrid_logs_the_share_of_the_steps_micro_batches(llara_run, monkeypatch):
    """`train/hybrid` of an optimizer step is the share of its micro-batches that read the slots (old: the last
    micro-batch's 0/1, which the logger kept for the whole step)."""
    module = llara_run[3]["model"]
    batch = next(iter(llara_run[3]["datamodule"].train_dataloader()))
    draws = iter([(True, 0), (False, 1), (False, 2), (True, 3), (False, 0), (False, 1)])  # two steps of 4
    logged = []
    monkeypatch.setattr(module, "_curriculum", lambda batch_idx: next(draws))
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.append(value) if name == "train/hybrid" else None)
    module.train()
    with torch.no_grad():
        for i in range(6):
            module.training_step(batch, i)
    assert logged == [1.0, 0.5, 1 / 3, 0.5, 0.0, 0.0]  # step 1 ends at 2 of 4; step 2 starts afresh
    module.slots.use_items = True


def test_text_only_steps_leave_the_projector_without_gradient(llara_run):
    objects = llara_run[3]
    module = objects["model"]
    batch = next(iter(objects["datamodule"].train_dataloader()))
    module.train()
    for use_items in (False, True):
        module.zero_grad()
        module.slots.use_items = use_items
        loss, _ = module.loss(module.response_batch(batch))
        loss.backward()
        grads = [p.grad for p in module.slots.parts["item_projector"].parameters()]
        assert all(g is None or not g.any() for g in grads) != use_items
    module.slots.use_items = True


def test_stage1_aligns_item_and_text_embeddings_and_changes_only_the_aligner(encoder_run):
    from msl_rec.training.sequential import SeqLitModule

    enc = SeqLitModule.load_from_checkpoint(next((encoder_run / "checkpoints").glob("epoch_*.ckpt"))).model.eval()
    tokens = torch.nn.Embedding(50, 16)
    slots = SlotEmbedding(tokens, enc, 50, "allmrec", latent=8)
    I = enc.num_items
    g = torch.Generator().manual_seed(0)
    text = torch.randn(I, 12, generator=g)
    history = torch.randint(0, I, (64, 3), generator=g)
    targets = torch.randint(0, I, (64,), generator=g)
    aligner0 = {k: v.clone() for k, v in slots.parts["aligner"].state_dict().items()}
    encoder0 = {k: v.clone() for k, v in enc.state_dict().items()}
    one = align_items(slots, text, history, torch.full((64,), 3), targets, {"epochs": 1, "lr": 1e-3, "seed": 0})
    slots.parts["aligner"].load_state_dict(aligner0)
    many = align_items(slots, text, history, torch.full((64,), 3), targets, {"epochs": 30, "lr": 1e-3, "seed": 0})
    assert many["match"] < one["match"] and many["item_rec"] < one["item_rec"]
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in encoder0.items()), "the encoder stays frozen"
    assert not any(p.requires_grad for p in slots.parts["aligner"].parameters())


# ---------------------------------------------------------------------------- checkpoints and evaluation
def test_a_hybrid_run_evaluates_to_its_validation_metrics_and_records_its_encoder(llara_run, tmp_path):
    run = llara_run[0]
    out = tmp_path / "eval"
    evaluate_app(compose("eval.yaml", TINY + [f"run_dir={run}", "subset=2", "data.eval_batch_size=1",
                                              "top_k=[1,5,10]"], out))
    got = json.loads((out / "metrics.json").read_text())
    best = json.loads((run / "metrics.json").read_text())
    for k in ("ndcg@10", "hr@10", "ndcg@1"):
        assert got[k] == best[k]
    key = json.loads((out / "eval_key.json").read_text())
    assert key["method"]["name"] == "llara" and len(key["method"]["encoder_sha256"]) == 64
    assert key["encoder_run"] == str(llara_run[1].method.encoder_run)  # where it was read (not part of the resume key)


def test_a_checkpoint_evaluated_by_path_is_labelled_by_its_trained_loss_and_records_its_encoder(llara_run, tmp_path):
    """``ckpt_path=`` alone: the eval config's default loss is LML; the run folder must say MSL (what was trained),
    or the report would put an MSL adapter in the LML row; its key names the encoder by content."""
    from experiments.report import load_run

    run, train_cfg = llara_run[0], llara_run[1]
    ckpt = run / "checkpoints" / "last.ckpt"
    out = tmp_path / "e"
    enc = f"method.encoder_run={train_cfg.method.encoder_run}"
    cfg = compose("eval.yaml", TINY + ["method=llara", enc, f"ckpt_path={ckpt}", "subset=2"], out)
    assert cfg.loss._target_.endswith("LMLLoss")  # the default the result was labelled with before
    _save_config(cfg, out)  # as the Hydra app does before the job runs
    evaluate_app(cfg)
    assert load_run(out)["label"] == "LLaRA+MSL"
    key = json.loads((out / "eval_key.json").read_text())
    assert key["method"]["encoder_sha256"] == train_cfg.method.encoder_sha256 and len(key["method"]["encoder_sha256"]) == 64
    with pytest.raises(ValueError, match="was trained with loss=msl, but the command line has 'loss=lml'"):
        from msl_rec.evaluation.runner import apply_checkpoint
        apply_checkpoint(compose("eval.yaml", TINY + ["method=llara", f"ckpt_path={ckpt}", "loss=lml"], tmp_path / "e2"),
                         ["method=llara", f"ckpt_path={ckpt}", "loss=lml"])


@pytest.mark.parametrize("decoder", ["cbs", "grounding"])
def test_a_hybrid_run_evaluates_with_the_other_decoders(llara_run, decoder, tmp_path):
    """Beyond the default cbs_masked: transformers-style masking after the softmax, and BIGRec's grounding (free
    generation from the slot prompt, then the nearest catalog title) rank 10 distinct catalog items per user."""
    out = tmp_path / decoder
    evaluate_app(compose("eval.yaml", TINY + [f"run_dir={llara_run[0]}", "subset=2", f"decoder={decoder}",
                                              "top_k=[1,5,10]"], out))
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and json.loads((out / "eval_key.json").read_text())["decoder"]["name"] == decoder
    for row in rows:
        items = [i for group in row["ranked_ids"] for i in group]
        assert len(row["ranked_ids"]) == 10 and len(set(items)) == len(items)


def test_msl_ats_trains_a_hybrid_method(encoder_run, tmp_path):
    """The fourth loss: MSL with the adaptive temperature, on A-LLMRec's slot prompts (its tau is logged)."""
    run, cfg, _, objects = _hybrid(tmp_path, encoder_run, "allmrec", "loss=msl_ats")
    loss = objects["model"].loss
    assert type(loss).__name__ == "MSLATSLoss" and int(loss.step) >= 1  # its optimizer steps were counted
    assert 1.5 - 1e-9 <= float(loss.tau_ema) <= 5  # the released rule's clamp (EMA of clamped values)
    assert "ndcg@10" in json.loads((run / "metrics.json").read_text())


def test_a_hybrid_checkpoint_evaluated_as_bigrec_is_refused(allmrec_run, tmp_path):
    ckpt = allmrec_run[0] / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="method=allmrec run; evaluate it with method=allmrec"):
        evaluate_app(compose("eval.yaml", TINY + [f"ckpt_path={ckpt}", "subset=2"], tmp_path / "e"))


def test_a_hybrid_checkpoint_holds_its_slot_parts_and_reloads_to_the_same_logits(allmrec_run):
    run, objects = allmrec_run[0], allmrec_run[3]
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    parts = {k.split("slot_parts.", 1)[1].split(".")[0] for k in state if "slot_parts." in k}
    assert parts == {"aligner", "item_projector", "user_projector"}  # the frozen aligner too; not the encoder
    module = objects["model"].eval()
    batch = _batch(objects)
    loaded = RecLitModule.load_from_checkpoint(ckpt).eval()
    assert isinstance(find_slots(loaded.model), SlotEmbedding)
    torch.testing.assert_close(_logits(loaded, batch), _logits(module, batch), rtol=0, atol=1e-6)


def test_another_encoder_is_refused_and_a_missing_one_is_named(allmrec_run, encoder_run, tmp_path):
    run = allmrec_run[0]
    other = tmp_path / "other.ckpt"
    raw = torch.load(next((encoder_run / "checkpoints").glob("epoch_*.ckpt")), weights_only=True)
    raw["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in raw["state_dict"].items()}
    torch.save(raw, other)
    with pytest.raises(CheckpointError, match="SHA-256"):
        evaluate_app(compose("eval.yaml", TINY + [f"run_dir={run}", "subset=2", f"method.encoder_run={other}"],
                             tmp_path / "e1"))
    with pytest.raises(FileNotFoundError, match="encoder_run"):
        evaluate_app(compose("eval.yaml", TINY + [f"run_dir={run}", "subset=2",
                                                  f"method.encoder_run={tmp_path / 'nowhere.ckpt'}"], tmp_path / "e2"))


@pytest.mark.parametrize("overrides, error, message", [
    (["method=llara", "loss=bce"], ValueError, "sequential model's loss"),
    (["method=allmrec", "decoder=item_scores"], ValueError, "decoder=item_scores"),
])
def test_hybrid_compositions_of_the_other_kind_are_refused(tmp_path, overrides, error, message):
    cfg = compose("train.yaml", TINY + overrides, tmp_path)
    with pytest.raises(error, match=message):
        check_method(cfg)


def test_a_hybrid_run_without_an_encoder_says_how_to_get_one(tmp_path):
    cfg = compose("train.yaml", TINY + ["method=llara", "method.encoder_run=null", "trainer.max_steps=1"], tmp_path)
    with pytest.raises(ValueError, match="method.encoder_run=<a `msl-rec-train method=sasrec` run"):
        train(cfg)


@pytest.mark.slow
def test_sdpo_from_a_hybrid_sft_run_keeps_the_sft_slot_parts(allmrec_run, encoder_run, tmp_path):
    sft = allmrec_run[0] / "checkpoints" / "last.ckpt"  # an A-LLMRec + LML run
    _, _, _, objects = _hybrid(tmp_path, encoder_run, "allmrec", "loss=sdpo", f"sdpo.sft_ckpt={sft}",
                               "data.train_subset=2")
    saved = torch.load(sft, weights_only=True)["state_dict"]
    for n, p in objects["model"].slots.parts.named_parameters():
        if not n.startswith("encoder."):
            key = next(k for k in saved if k.endswith("slot_parts." + n))
            assert torch.equal(p.detach(), saved[key]) and not p.requires_grad


def test_llara_asks_ddp_to_find_unused_parameters():
    """LLaRA's text-only curriculum steps leave the projector out of the loss: DDP must be told (old: a DDP run
    stopped at the first text-only step, "parameters that were not used in producing the loss")."""
    from lightning.pytorch.strategies import DDPStrategy

    from msl_rec.train import build_strategy

    target = {"_target_": "lightning.pytorch.strategies.DDPStrategy", "process_group_backend": "gloo"}
    assert build_strategy(dict(target), find_unused=True)._ddp_kwargs["find_unused_parameters"] is True
    assert "find_unused_parameters" not in build_strategy(dict(target))._ddp_kwargs
    assert isinstance(build_strategy(dict(target)), DDPStrategy)
    assert build_strategy("ddp", find_unused=True) == "ddp_find_unused_parameters_true"
    assert build_strategy("ddp") == "ddp"


@pytest.mark.slow
def test_llara_trains_under_ddp_through_text_only_steps(encoder_run, tmp_path, tiny_overrides, cli):
    assert [hybrid_step(0, s, 0, 4) for s in range(4)].count(False) >= 2  # seed 0: text-only steps happen
    cli("msl_rec.train", *tiny_overrides, "trainer=ddp_sim", "method=llara", f"method.encoder_run={encoder_run}",
        "method.curriculum.seed=0", "logger=none", "data.train_subset=16", "data.valid_subset=2",
        "optim.global_batch_size=4", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}", timeout=400)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
