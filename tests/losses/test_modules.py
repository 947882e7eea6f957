"""The loss modules: flags, metrics, ATS state, S-DPO wiring, Hydra configs, ATS under DDP."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from msl_rec.losses import LMLLoss, MSLATSLoss, MSLLoss, ResponseBatch, SDPOLoss
from msl_rec.losses import functional as LF

from ._reference import V, dense_mask, dense_msl, dense_w, make_batch

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "loss"


def _f32(b: ResponseBatch) -> ResponseBatch:
    return dataclasses.replace(b, hidden=b.hidden.float(), weight=b.weight.float())


def test_flags():
    assert MSLLoss.needs_valid_ids and MSLATSLoss.needs_valid_ids and not LMLLoss.needs_valid_ids
    assert SDPOLoss().needs_reference and SDPOLoss().num_negatives == 3 and LMLLoss.num_negatives == 0


def test_lml_metrics():
    b = make_batch(seed=1)
    _loss, metrics = LMLLoss(tau=1.5)(_f32(b))
    logits = b.hidden @ b.weight.T
    multi = (b.valid_ids >= 0).sum(1) > 1
    # Fig. 5's w for LML: 1 - P(y) under the full softmax at the loss's tau, multi-choice positions
    w = 1 - torch.softmax(logits / 1.5, 1).gather(1, b.labels[:, None]).squeeze(1)
    assert metrics["w_mean"] == pytest.approx(w[multi].mean().item(), abs=1e-6)
    p_valid = (torch.softmax(logits / 1.5, 1) * dense_mask(b.valid_ids, V)).sum(1)
    assert metrics["invalid_mass"] == pytest.approx((1 - p_valid[multi]).mean().item(), abs=1e-6)
    assert metrics["valid_size"] == pytest.approx((b.valid_ids >= 0).sum(1).double().mean().item())
    _, no_valid = LMLLoss()(_f32(dataclasses.replace(b, valid_ids=None)))
    assert set(no_valid) == {"loss", "tau", "w_mean"}
    w1 = 1 - torch.softmax(logits, 1).gather(1, b.labels[:, None]).squeeze(1)
    assert no_valid["w_mean"] == pytest.approx(w1.mean().item(), abs=1e-6)


@pytest.mark.parametrize("alpha_mode", [False, True])
def test_msl_module_matches_dense(alpha_mode):
    b = make_batch(seed=2)
    loss, metrics = MSLLoss(tau=1.5, alpha_mode=alpha_mode)(_f32(b))
    ref = dense_msl(b.hidden, b.weight, b.labels, b.valid_ids, 1.5, alpha_mode)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    multi = (b.valid_ids >= 0).sum(1) > 1
    w = dense_w(b.hidden @ b.weight.T, b.labels, b.valid_ids, 1.5)
    assert metrics["tau"] == 1.5 and metrics["w_mean"] == pytest.approx(w[multi].mean().item(), abs=1e-6)
    assert 0 <= metrics["invalid_mass"] <= 1
    _, lean = MSLLoss(log_invalid_mass=False)(_f32(b))
    assert "invalid_mass" not in lean and "valid_size" in lean and "w_mean" in lean
    with pytest.raises(ValueError):
        MSLLoss()(_f32(dataclasses.replace(b, valid_ids=None)))


def test_msl_w_is_smaller_than_lml_w():
    """Fig. 5: on the same logits and tau, MSL's w (1 - P_valid(y)) is below LML's (1 - P(y))."""
    for seed in range(3):
        b = _f32(make_batch(seed=seed, scale=2.0))
        for tau in (1.0, 2.0):
            w_msl = MSLLoss(tau=tau)(b)[1]["w_mean"]
            w_lml = LMLLoss(tau=tau)(b)[1]["w_mean"]
            assert w_msl < w_lml


# ------------------------------------------------------------------ ATS


def _eq12_tau(b: ResponseBatch, at: torch.Tensor | None = None, **kw) -> tuple[float, float]:
    """(raw root, m) of Eq. 12 straight from the chosen positions (default: first), dense logits."""
    at = b.first if at is None else at
    logits = (b.hidden @ b.weight.T).double()[at]
    vids = b.valid_ids[at]
    valid = torch.cat([logits[i, v[v >= 0]] for i, v in enumerate(vids)])
    pos = logits.gather(1, b.labels[at].unsqueeze(1))
    m = (vids >= 0).sum(1).double().mean()
    return LF.ats_temperature(pos, valid, m, **kw).item(), m.item()


def _widest_brute(b: ResponseBatch) -> torch.Tensor:
    sizes = (b.valid_ids >= 0).sum(1).tolist()
    at = torch.zeros(len(sizes), dtype=torch.bool)
    for s in range(b.num_sequences):
        rows = [i for i in range(len(sizes)) if int(b.seq_index[i]) == s]
        at[max(rows, key=lambda i: (sizes[i], -i))] = True
    return at


def _step(loss_fn: MSLATSLoss, *micro_batches: ResponseBatch) -> tuple[list[float], dict[str, float]]:
    """One optimizer step: forward every micro-batch, then on_optimizer_step. Returns the taus used."""
    taus = [loss_fn(mb)[1]["tau"] for mb in micro_batches]
    return taus, loss_fn.on_optimizer_step()


@pytest.mark.parametrize("root", ["plus", "minus"])
@pytest.mark.parametrize("stats_at", ["root", "widest"])
def test_ats_raw_tau_matches_eq12(root, stats_at):
    b = make_batch(num_seqs=6, seed=3, dtype=torch.float64)
    # the clamp as wide as a temperature allows (tau_min > 0): tau_raw is logged unclamped
    loss_fn = MSLATSLoss(root=root, stats_at=stats_at, tau_min=1e-9, tau_max=1e9, ema_init=None)
    _, logged = _step(loss_fn, b)
    at = None if stats_at == "root" else _widest_brute(b)
    raw, m = _eq12_tau(b, at, root=root)
    assert logged["tau_raw"] == pytest.approx(raw, rel=1e-6)  # C = log(m eta) near 0 amplifies rounding
    assert logged["ats_m"] == pytest.approx(m)
    # ema_init None: starts at the first clamped root (three of these four roots are negative)
    assert float(loss_fn.tau_ema) == pytest.approx(max(raw, 1e-9), rel=1e-6)
    if stats_at == "widest":
        assert m > _eq12_tau(b)[1]  # this batch's roots are not its widest positions


def test_ats_ema_starts_at_1_5_as_released():
    batches = [make_batch(seed=s, scale=0.3 + s) for s in range(4)]
    loss_fn = MSLATSLoss()  # ema 0.05, clamp [1.5, 5], ema_init 1.5
    expected = 1.5
    for b in batches:
        taus, _logged = _step(loss_fn, b)
        assert taus == [pytest.approx(expected)]  # the step trains with the previous step's tau
        clamped = min(max(_eq12_tau(b)[0], 1.5), 5.0)
        expected = 0.95 * expected + 0.05 * clamped
        assert float(loss_fn.tau_ema) == pytest.approx(expected)
    assert int(loss_fn.step) == 4


@pytest.mark.parametrize("stats_at", ["root", "widest"])
def test_ats_accumulation_equals_one_big_step(stats_at):
    """4 micro-batches of one optimizer step give the tau of one step over their concatenation."""
    b = make_batch(num_seqs=8, seed=12, dtype=torch.float64)
    parts = [_split(b, slice(2 * i, 2 * i + 2)) for i in range(4)]
    kw = {"stats_at": stats_at, "ema": 0.3}
    whole, accumulated = MSLATSLoss(**kw), MSLATSLoss(**kw)
    for _ in range(2):
        _, one = _step(whole, b)
        taus, four = _step(accumulated, *parts)
        assert len(set(taus)) == 1  # one tau for every micro-batch of the step
        assert four["tau_raw"] == pytest.approx(one["tau_raw"], rel=1e-9)
        assert four["ats_m"] == pytest.approx(one["ats_m"])
        assert float(accumulated.tau_ema) == pytest.approx(float(whole.tau_ema), rel=1e-12)
    assert float(whole.tau_ema) != 1.5


def test_ats_tau_changes_once_per_optimizer_step():
    batches = [make_batch(seed=s, scale=2 + s) for s in range(8)]
    loss_fn = MSLATSLoss(ema=0.5, tau_min=0.1, tau_max=50)
    used = []
    for i in range(0, 8, 4):  # accumulation 4: two optimizer steps
        taus, _ = _step(loss_fn, *batches[i:i + 4])
        used.append(taus)
    assert all(len(set(t)) == 1 for t in used)
    assert used[0][0] == 1.5 and used[1][0] != used[0][0]
    assert int(loss_fn.step) == 2


def test_ats_warmup_eval_and_checkpoint():
    batches = [make_batch(seed=s, scale=0.3 + s) for s in range(5)]
    loss_fn = MSLATSLoss(ema=0.2, warmup_steps=2, warmup_tau=0.9, ema_init=None)
    taus = [_step(loss_fn, b)[0][0] for b in batches]
    assert taus[:3] == [0.9, 0.9, 0.9]  # 2 warm-up steps, then a step with no EMA value yet
    expected = min(max(_eq12_tau(batches[2])[0], 1.5), 5.0)
    assert taus[3] == pytest.approx(expected)
    expected = 0.8 * expected + 0.2 * min(max(_eq12_tau(batches[3])[0], 1.5), 5.0)
    assert taus[4] == pytest.approx(expected)
    state = loss_fn.state_dict()
    assert set(state) == {"tau_ema", "step"}
    # eval: uses the trained tau, accumulates nothing
    loss_fn.eval()
    before = float(loss_fn.tau_ema)
    assert loss_fn(batches[0])[1]["tau"] == pytest.approx(before) and not loss_fn.pending.any()
    # a restored copy continues identically
    restored = MSLATSLoss(ema=0.2, warmup_steps=2, warmup_tau=0.9, ema_init=None)
    restored.load_state_dict(state)
    loss_fn.train()
    assert _step(restored, batches[1])[1] == _step(loss_fn, batches[1])[1]
    assert float(restored.tau_ema) == float(loss_fn.tau_ema)


def test_ats_loss_uses_its_tau_and_has_grads():
    b = make_batch(seed=4)
    loss_fn = MSLATSLoss(ema_init=2.0)
    h = b.hidden.float().requires_grad_(True)
    loss, metrics = loss_fn(dataclasses.replace(b, hidden=h, weight=b.weight.float()))
    assert metrics["tau"] == 2.0
    assert loss.item() == pytest.approx(dense_msl(b.hidden, b.weight, b.labels, b.valid_ids, 2.0).item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


def _split(b: ResponseBatch, seqs: slice) -> ResponseBatch:
    keep = (b.seq_index >= seqs.start) & (b.seq_index < seqs.stop)
    return dataclasses.replace(
        b, hidden=b.hidden[keep], labels=b.labels[keep], seq_index=b.seq_index[keep] - seqs.start,
        first=b.first[keep], num_sequences=seqs.stop - seqs.start, valid_ids=b.valid_ids[keep])


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        b = make_batch(num_seqs=6, seed=5)
        # uneven shards, 2 micro-batches per rank per step
        parts = [_split(b, slice(0, 1)), _split(b, slice(1, 2))] if rank == 0 else [
            _split(b, slice(2, 4)), _split(b, slice(4, 6))]
        # a clamp below this batch's root (1.03), so it cannot hide a desync between the ranks
        loss_fn = MSLATSLoss(tau_min=1e-3, tau_max=1e9, ema=0.5)
        taus = []
        for _ in range(2):
            used, _logged = _step(loss_fn, *parts)
            taus.append(used[0])
        taus.append(float(loss_fn.tau_ema))
        torch.save(taus, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two spawned ranks (~30 s); make test-full
def test_ats_same_tau_on_every_rank(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    single = MSLATSLoss(tau_min=1e-3, tau_max=1e9, ema=0.5)
    b = make_batch(num_seqs=6, seed=5)
    expected = [_step(single, b)[0][0] for _ in range(2)] + [float(single.tau_ema)]
    assert rank0 == rank1
    assert rank0 == pytest.approx(expected, rel=1e-6)  # fp32 logits, other row blocks
    assert rank0[2] != 1.5


def test_sdpo_module():
    b = make_batch(num_seqs=8, seed=6)  # B = 2 samples, 3 negatives each
    ref = torch.randn(8, dtype=torch.float64)
    loss_fn = SDPOLoss(beta=1.0, num_negatives=3)
    loss, metrics = loss_fn(dataclasses.replace(b, ref_logps=ref))
    logps = LF.sequence_logps(b.hidden, b.weight, b.labels, b.seq_index, 8)
    expected = LF.sdpo_loss(logps[:2], logps[2:].view(2, 3), ref[:2], ref[2:].view(2, 3))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    r = logps - ref
    assert metrics["reward_accuracy"] == pytest.approx(
        (r[:2] > r[2:].view(2, 3).max(1).values).double().mean().item())
    with pytest.raises(ValueError):
        loss_fn(b)  # no ref_logps


def test_configs_instantiate(tmp_path):
    from msl_rec.losses import build_loss
    from tests.conftest import compose

    built = {name: build_loss(compose("train.yaml", ["backbone=tiny_llama", f"loss={name}"], tmp_path).loss)
             for name in ("lml", "msl", "msl_ats", "sdpo")}
    assert isinstance(built["lml"], LMLLoss) and type(built["msl"]) is MSLLoss
    ats = built["msl_ats"]
    assert isinstance(ats, MSLATSLoss) and ats.root == "plus" and ats.stats_at == "root"  # no backbone: root
    assert float(ats.tau_ema) == 1.5 and ats.ema == 0.05 and ats.eta == 0.25
    assert (ats.tau_min, ats.tau_max) == (1.5, 5.0)
    sdpo = built["sdpo"]
    assert (sdpo.beta, sdpo.num_negatives) == (1.0, 3)  # the recipe lives in experiment=books_sdpo
