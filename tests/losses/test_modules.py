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

from ._reference import V, dense_mask, dense_msl, make_batch

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "loss"


def _f32(b: ResponseBatch) -> ResponseBatch:
    return dataclasses.replace(b, hidden=b.hidden.float(), weight=b.weight.float())


def test_flags():
    assert MSLLoss.needs_valid_ids and MSLATSLoss.needs_valid_ids and not LMLLoss.needs_valid_ids
    assert SDPOLoss().needs_reference and SDPOLoss().num_negatives == 3 and LMLLoss.num_negatives == 0


def test_lml_metrics():
    b = make_batch(seed=1)
    _loss, metrics = LMLLoss()(_f32(b))
    logits = b.hidden @ b.weight.T
    p_valid = (torch.softmax(logits, 1) * dense_mask(b.valid_ids, V)).sum(1)
    multi = (b.valid_ids >= 0).sum(1) > 1
    assert metrics["w_mean"] == pytest.approx((1 - p_valid[multi]).mean().item(), abs=1e-6)
    assert metrics["valid_size"] == pytest.approx((b.valid_ids >= 0).sum(1).double().mean().item())
    _, no_valid = LMLLoss()(_f32(dataclasses.replace(b, valid_ids=None)))
    assert set(no_valid) == {"loss"}


@pytest.mark.parametrize("alpha_mode", [False, True])
def test_msl_module_matches_dense(alpha_mode):
    b = make_batch(seed=2)
    loss, metrics = MSLLoss(tau=1.5, alpha_mode=alpha_mode)(_f32(b))
    ref = dense_msl(b.hidden, b.weight, b.labels, b.valid_ids, 1.5, alpha_mode)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert metrics["tau"] == 1.5 and 0 <= metrics["w_mean"] <= 1
    _, lean = MSLLoss(log_w=False)(_f32(b))
    assert "w_mean" not in lean and "valid_size" in lean
    with pytest.raises(ValueError):
        MSLLoss()(_f32(dataclasses.replace(b, valid_ids=None)))


def _root_tau(b: ResponseBatch, **kw) -> float:
    """Eq. 12 straight from the first positions, with the dense logits."""
    logits = (b.hidden @ b.weight.T).double()[b.first]
    vids = b.valid_ids[b.first]
    valid = torch.cat([logits[i, v[v >= 0]] for i, v in enumerate(vids)])
    pos = logits.gather(1, b.labels[b.first].unsqueeze(1))
    m = (vids >= 0).sum(1).double().mean()
    return LF.ats_temperature(pos, valid, m, **kw).item()


@pytest.mark.parametrize("root", ["plus", "minus"])
def test_ats_raw_tau_matches_eq12(root):
    b = make_batch(num_seqs=6, seed=3)
    loss_fn = MSLATSLoss(root=root, tau_min=-1e9, tau_max=1e9)
    _, metrics = loss_fn(b)
    assert metrics["tau_raw"] == pytest.approx(_root_tau(b, root=root), rel=1e-6)  # fp32 logits
    assert metrics["tau"] == pytest.approx(metrics["tau_raw"], rel=1e-9)  # first step: no smoothing


def test_ats_clamp_ema_warmup_and_checkpoint():
    batches = [make_batch(seed=s, scale=0.3 + s) for s in range(6)]
    raws = [_root_tau(b, root="plus") for b in batches]
    loss_fn = MSLATSLoss(tau_min=1.5, tau_max=5.0, ema=0.2, warmup_steps=2, warmup_tau=0.9)
    taus = [loss_fn(b)[1]["tau"] for b in batches]
    assert taus[:2] == [0.9, 0.9]
    clamped = [min(max(r, 1.5), 5.0) for r in raws]
    expected = clamped[2]
    assert taus[2] == pytest.approx(expected)
    for t, c in zip(taus[3:], clamped[3:]):
        expected = 0.8 * expected + 0.2 * c
        assert t == pytest.approx(expected)
    assert int(loss_fn.step) == 6
    state = loss_fn.state_dict()
    assert set(state) == {"tau_ema", "step"}
    # eval: uses the trained tau, changes nothing
    loss_fn.eval()
    assert loss_fn(batches[0])[1]["tau"] == pytest.approx(expected) and int(loss_fn.step) == 6
    # a restored copy continues identically
    restored = MSLATSLoss(tau_min=1.5, tau_max=5.0, ema=0.2, warmup_steps=2, warmup_tau=0.9)
    restored.load_state_dict(state)
    loss_fn.train()
    assert restored(batches[1])[1]["tau"] == pytest.approx(loss_fn(batches[1])[1]["tau"])


def test_ats_loss_uses_its_tau_and_has_grads():
    b = make_batch(seed=4)
    loss_fn = MSLATSLoss(tau_min=2.0, tau_max=2.0)
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
        part = _split(b, slice(0, 2) if rank == 0 else slice(2, 6))  # uneven shards
        loss_fn = MSLATSLoss(tau_min=-1e9, tau_max=1e9, ema=0.5)
        taus = [loss_fn(part)[1]["tau"] for _ in range(2)]
        torch.save(taus, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ats_same_tau_on_every_rank(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    single = MSLATSLoss(tau_min=-1e9, tau_max=1e9, ema=0.5)
    b = make_batch(num_seqs=6, seed=5)
    expected = [single(b)[1]["tau"] for _ in range(2)]
    assert rank0 == rank1
    assert rank0 == pytest.approx(expected, rel=1e-6)  # fp32 logits, other row blocks


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


def test_configs_instantiate():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    built = {name: instantiate(OmegaConf.load(CONFIGS / f"{name}.yaml")) for name in ("lml", "msl", "msl_ats", "sdpo")}
    assert isinstance(built["lml"], LMLLoss) and type(built["msl"]) is MSLLoss
    assert isinstance(built["msl_ats"], MSLATSLoss) and built["msl_ats"].root == "plus"
    sdpo = built["sdpo"]
    assert (sdpo.beta, sdpo.num_negatives) == (1.0, 3)  # the recipe lives in experiment=books_sdpo
