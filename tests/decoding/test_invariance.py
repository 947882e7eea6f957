"""Metrics and rankings do not depend on how an evaluation is split, nor on the machine (issue 19 §1).

In bf16 one user's beam scores moved by up to 0.08 between decoder batch 1 and 10 or with the shared
preamble on and off, and most ranked lists differed from transformers' ``generate``; the old
``dtype: auto`` chose bf16 exactly on CPUs with native bf16. Decoding and scoring now run in float32
by default everywhere. Through the real eval app on real Books valid users, with a non-trivial LoRA
adapter, these tests pin identical ranked lists and scores within 1e-5 for

(a) ``data.eval_batch_size`` 1 vs 10, (b) ``decoder.share_preamble`` true vs false, (c) ``shard=0/2`` +
``shard=1/2`` merged vs one process, and (d) lists equal to ``generate(num_beams=K,
num_return_sequences=K, prefix_allowed_tokens_fn=...)`` with ``decoder=cbs``.

The eval runs pretend the CPU computes bf16 natively (``cpu_supports_bf16`` -> True), so what they
check cannot depend on the machine that runs them. The tiny LLaMA runs always; SmolLM2 with the
committed adapter is ``slow``. Also: validation under ``bf16-mixed`` (Lightning's autocast) and the
target scorer (autocast, a bf16 model, a bf16 decoder) give the float32 numbers.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from msl_rec.data.build import build_data
from msl_rec.decoding import ConstrainedBeamSearch, build_decoder
from msl_rec.eval import evaluate_app
from msl_rec.evaluation import BatchPredictor
from msl_rec.train import train
from msl_rec.training.module import RecLitModule
from msl_rec.utils import precision
from msl_rec.utils.config import PROJECT_ROOT
from tests.conftest import TINY, compose
from tests.decoding.test_beam_exact import hf_reference

TOL = 1e-5          # beam scores (length-normalised log-probs) and metrics, absolute
LOGP_RTOL = 1e-6    # target_logp sums ~20-80 tokens' log-probs (SmolLM2: ~ -50): also 1e-6 relative
COMMITTED_ADAPTER = Path(PROJECT_ROOT) / "results/compare_cpu/msl.ckpt"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the tiny model's matrices are too small to share, and on a busy 2-core machine
    two threads fighting for the cores made these runs ~5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory):
    """The tiny LLaMA after one training step (fdr), its LoRA B matrices then set to seeded random values
    (a fresh adapter is the identity; this one changes the logits), saved by the module's checkpoint code."""
    out = tmp_path_factory.mktemp("tiny_adapter")
    _, objects = train(compose("train.yaml", TINY + ["loss=msl", "debug=fdr", "data.valid_subset=10"], out))
    module = objects["model"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    ckpt = out / "adapter.ckpt"
    objects["trainer"].save_checkpoint(ckpt)
    return SimpleNamespace(ckpt=ckpt, out=out, module=module, dm=objects["datamodule"])


@pytest.fixture(scope="module", params=["tiny_llama", pytest.param("smollm2_135m", marks=pytest.mark.slow)])
def setup(request, tmp_path_factory):
    """Eval-app settings for one backbone and its adapter, and the reference run: all users in one
    process and one decoder batch, shared preamble on (the configs' default). Tiny: ``cbs_masked`` (the
    metrics' decoder), ``cbs`` for generate. SmolLM2 (slow): ``cbs`` throughout (its reference run is
    also the one compared with generate), 8 users, 5 beams, target_logp without sampled ranks, to
    stay within a few minutes on 2 cores; max_new_tokens as configured."""
    base = [f"backbone={request.param}", "logger=none"]
    if request.param == "tiny_llama":
        ckpt, n_users = request.getfixturevalue("tiny_trained").ckpt, 10
        base += ["scoring.num_negatives=9"]
    else:
        ckpt, n_users = COMMITTED_ADAPTER, 8
        base += ["decoder=cbs", "decoder.num_beams=5", "top_k=[1,5]", "scoring.num_negatives=0"]
    s = SimpleNamespace(root=tmp_path_factory.mktemp(f"eval_{request.param}"), ckpt=ckpt, n=n_users,
                        base=[*base, f"ckpt_path={ckpt}", f"subset={n_users}"])
    s.ref = run_eval(s, "ref", f"data.eval_batch_size={n_users}")
    return s


def run_eval(s, name: str, *overrides: str) -> list[dict]:
    """Run the eval app into ``s.root/name`` on a machine that claims native bf16; its predictions."""
    out = s.root / name
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(precision, "cpu_supports_bf16", lambda: True)
        evaluate_app(compose("eval.yaml", [*s.base, *overrides], out))
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def assert_same(what: str, a: list[dict], b: list[dict]) -> None:
    """Two evaluations hold the same users with identical ranked lists and sampled ranks, beam scores
    within ``TOL`` and target_logp within ``TOL`` or ``LOGP_RTOL`` relative; prints the figures."""
    assert len(a) == len(b) >= 1
    assert [(p["row"], p["user_id"]) for p in a] == [(p["row"], p["user_id"]) for p in b]
    beam = max(abs(x - y) for pa, pb in zip(a, b) for x, y in zip(pa["scores"], pb["scores"]))
    logp = max(abs(pa["target_logp"] - pb["target_logp"]) for pa, pb in zip(a, b))
    same = [p["ranked_ids"] for p in a] == [p["ranked_ids"] for p in b]
    print(f"\n{what}: {len(a)} users, lists identical: {same}, max |score diff| {beam:.2e}, "
          f"max |target_logp diff| {logp:.2e}")
    assert same
    assert [p.get("sampled_rank") for p in a] == [p.get("sampled_rank") for p in b]
    assert beam <= TOL
    assert [p["target_logp"] for p in a] == pytest.approx([p["target_logp"] for p in b], abs=TOL, rel=LOGP_RTOL)


def test_decoder_batch_1_equals_one_batch_of_all(setup):
    one = run_eval(setup, "batch1", "data.eval_batch_size=1")
    assert_same("batch 1 vs all in one", setup.ref, one)


def test_shared_preamble_on_equals_off(setup):
    off = run_eval(setup, "no_preamble", f"data.eval_batch_size={setup.n}", "decoder.share_preamble=false")
    assert_same("share_preamble on vs off", setup.ref, off)


def test_two_shards_merged_equal_one_process(setup):
    shards = [setup.root / f"shard{i}" for i in range(2)]
    for i in range(2):
        run_eval(setup, shards[i].name, f"data.eval_batch_size={setup.n}", f"shard={i}/2")
    merged = run_eval(setup, "merged", f"merge=[{shards[0]},{shards[1]}]")
    assert_same("shards 0/2 + 1/2 merged vs one process", setup.ref, merged)


def test_ranked_lists_equal_transformers_generate(setup):
    """``decoder=cbs`` through the eval app (length-sorted batch) vs ``generate`` on the same users."""
    if "decoder=cbs" in setup.base:
        overrides, got = [], setup.ref
    else:
        overrides = ["decoder=cbs", f"data.eval_batch_size={setup.n}"]
        got = run_eval(setup, "cbs", *overrides)
    cfg = compose("eval.yaml", [*setup.base, *overrides], setup.root / "generate")
    assert cfg.decoder.name == "cbs"
    tokenizer, catalog, dm = build_data(cfg)
    dm.setup("validate")
    decoder = build_decoder(cfg.decoder, catalog, top_k=cfg.top_k)
    model = RecLitModule.load_from_checkpoint(setup.ckpt).model.eval()
    batch = next(iter(dm.eval_dataloader("valid", list(range(setup.n)))))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else catalog.eos_id
    with torch.no_grad():
        ref = hf_reference(model, catalog, batch, decoder.num_beams, decoder.length_penalty, renormalize=False,
                           max_new_tokens=decoder.max_new_tokens, early_stopping=decoder.early_stopping,
                           pad_token_id=pad)
    assert [p["user_id"] for p in got] == batch["user_ids"].tolist()
    want = [[list(catalog.seq_items[s]) for s, _ in r] for r in ref]
    n_same = sum(p["ranked_ids"] == w for p, w in zip(got, want))
    diff = max(abs(x - sc) for p, r in zip(got, ref) for x, (_, sc) in zip(p["scores"], r))
    print(f"\ncbs vs transformers generate: {len(got)} users, lists identical for {n_same}, "
          f"max |score diff| {diff:.2e}")
    assert n_same == len(got) and all(len(p["ranked_ids"]) == decoder.num_beams for p in got)
    assert diff <= TOL


# ---------------------------------------------------------------- bf16 autocast and bf16 models (tiny)
def test_validation_under_bf16_mixed_autocast_gives_the_float32_metrics(tiny_trained, monkeypatch):
    module, dm = tiny_trained.module, tiny_trained.dm
    autocast_seen = []
    step = module.validation_step

    def spy(*args, **kwargs):  # Lightning wraps the step, not the callbacks, in its autocast
        autocast_seen.append(torch.is_autocast_enabled("cpu"))
        return step(*args, **kwargs)

    monkeypatch.setattr(module, "validation_step", spy)
    metrics = {}
    for prec in ("32-true", "bf16-mixed"):
        trainer = L.Trainer(accelerator="cpu", devices=1, precision=prec, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.validate(module, datamodule=dm, verbose=False)
        metrics[prec] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    n_steps = len(autocast_seen) // 2
    assert autocast_seen == [False] * n_steps + [True] * n_steps and n_steps >= 2  # bf16-mixed really autocast
    fp32, mixed = metrics["32-true"], metrics["bf16-mixed"]
    assert {"val/target_logp", "val/ndcg@10"} <= set(fp32) and set(fp32) == set(mixed)
    diff = max(abs(fp32[k] - mixed[k]) for k in fp32)
    print(f"\nvalidation bf16-mixed vs 32-true: {len(dm.val_dataloader().dataset)} users, "
          f"max |metric diff| {diff:.2e} (val/target_logp {fp32['val/target_logp']:.6f})")
    assert diff <= TOL


def test_training_metrics_json_records_the_decode_dtype(tiny_trained):
    saved = json.loads((tiny_trained.out / "metrics.json").read_text())
    assert saved["decode_dtype"] == "float32" and "ndcg@10" in saved


def test_target_scorer_is_float32_under_autocast_for_a_bf16_model_and_a_bf16_decoder(tiny_trained):
    module, dm = tiny_trained.module, tiny_trained.dm
    model = module.model.eval()
    batch = next(iter(dm.val_dataloader()))
    scoring = {"num_negatives": 5}

    def predictor(dtype="float32"):
        dec = ConstrainedBeamSearch(dm.catalog, num_beams=3, top_k=[1], max_new_tokens=8, dtype=dtype)
        return BatchPredictor(dec, dm.catalog, scoring)

    want = predictor().predict(model, batch)

    def assert_close(got, expected):
        assert [r["sampled_rank"] for r in got] == [r["sampled_rank"] for r in expected]
        assert [r["target_logp"] for r in got] == pytest.approx([r["target_logp"] for r in expected], abs=TOL)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_close(predictor().predict(model, batch), want)
    # a bf16 model is scored in float32: as its weights cast up, not in bf16 arithmetic
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert_close(predictor().predict(bf16, batch), predictor().predict(copy.deepcopy(bf16).float(), batch))
    assert next(bf16.parameters()).dtype == torch.bfloat16  # never cast in place
    # decoding in bf16 (an explicit choice) leaves the target signal in float32
    r16 = predictor("bfloat16")
    assert r16.compute_dtype == "bfloat16"
    assert_close(r16.predict(model, batch), want)
