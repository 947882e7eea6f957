"""The functional losses against dense references written from the equations."""

from __future__ import annotations

import math

import pytest
import torch

from msl_rec.losses import functional as LF

from ._reference import V, dense_mask, dense_msl, dense_w, make_batch, value_and_grads


def _check(fn, ref, batch, atol=1e-5, rtol=1e-5):
    """fp32 ``fn`` vs float64 dense ``ref``: value and gradients to hidden and weight."""
    out, gh, gw = value_and_grads(fn, batch.hidden.float(), batch.weight.float())
    ref_out, ref_gh, ref_gw = value_and_grads(ref, batch.hidden.double(), batch.weight.double())
    for got in (out, gh, gw):
        assert torch.isfinite(got).all()
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(gh.double(), ref_gh, atol=atol, rtol=rtol)
    torch.testing.assert_close(gw.double(), ref_gw, atol=atol, rtol=rtol)


@pytest.mark.parametrize("tau", [1.0, 0.7, 3.0])
@pytest.mark.parametrize("ties", [False, True])
def test_msl_from_hidden_matches_dense(tau, ties):
    b = make_batch(seed=1, ties=ties)
    _check(lambda h, w: LF.msl_loss_from_hidden(h, w, b.labels, b.valid_ids, tau),
           lambda h, w: dense_msl(h, w, b.labels, b.valid_ids, tau), b)


def test_msl_loss_equals_from_hidden():
    b = make_batch(seed=2)
    h, w = b.hidden.float(), b.weight.float()
    dense_logits = h @ w.T
    a = LF.msl_loss(dense_logits, b.labels, b.valid_ids, 1.3)
    c = LF.msl_loss_from_hidden(h, w, b.labels, b.valid_ids, 1.3)
    torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-6)
    _check(lambda h, w: LF.msl_loss(h @ w.T, b.labels, b.valid_ids, 1.3),
           lambda h, w: dense_msl(h, w, b.labels, b.valid_ids, 1.3), b)


@pytest.mark.parametrize("loss_name", ["msl", "alpha"])
def test_large_logits_stay_finite_and_exact(loss_name):
    b = make_batch(seed=3, scale=3e3)  # logits of order 1e4
    logits = b.hidden @ b.weight.T
    assert logits.abs().max() > 5e3
    if loss_name == "msl":
        fn = lambda h, w: LF.msl_loss_from_hidden(h, w, b.labels, b.valid_ids)
    else:
        fn = lambda h, w: _alpha_from_hidden(h, w, b.labels, b.valid_ids)
    ref = lambda h, w: dense_msl(h, w, b.labels, b.valid_ids, alpha_mode=loss_name == "alpha")
    # fp32 logits of 1e4 carry ~1e-3 absolute error; compare relative to that scale.
    _check(fn, ref, b, atol=5e-2, rtol=1e-4)


def _alpha_from_hidden(h, w, labels, valid_ids, tau=1.0):
    logits, label_cols, valid_cols = LF.union_logits(h, w, labels, valid_ids)
    return LF.msl_alpha_loss(logits, label_cols, valid_cols, w.shape[0], tau)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_alpha_mode_matches_dense(tau):
    b = make_batch(seed=4)
    _check(lambda h, w: _alpha_from_hidden(h, w, b.labels, b.valid_ids, tau),
           lambda h, w: dense_msl(h, w, b.labels, b.valid_ids, tau, alpha_mode=True), b)


def test_alpha_mode_by_hand():
    # V = 5; row 0: valid {0, 1, 2}, target 0 -> alpha = 5/3 on tokens 1, 2; token 3, 4 invalid (out).
    # row 1: valid {3, 4}, target 4 -> alpha = 5/2 on token 3. tau = 2.
    logits = torch.tensor([[1.0, 2.0, 3.0, 50.0, -7.0], [0.5, 9.0, 9.0, -1.0, 2.0]], dtype=torch.float64)
    labels = torch.tensor([0, 4])
    valid_ids = torch.tensor([[0, 1, 2], [3, 4, -1]])
    tau = 2.0
    e = math.exp
    row0 = -tau * math.log(e(0.5) / (e(0.5) + 5 / 3 * (e(1.0) + e(1.5))))
    row1 = -tau * math.log(e(1.0) / (e(1.0) + 5 / 2 * e(-0.5)))
    got = LF.msl_alpha_loss(logits, labels, valid_ids, 5, tau)
    assert got.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    # the column order is irrelevant (union logits put the ids in another order): permute them
    perm = torch.tensor([4, 2, 0, 3, 1])
    inv = torch.argsort(perm)
    got_perm = LF.msl_alpha_loss(logits[:, perm], inv[labels], torch.where(valid_ids >= 0, inv[valid_ids.clamp_min(0)],
                                                                             -1), 5, tau)
    assert got_perm.item() == pytest.approx(got.item(), rel=1e-6)


def test_alpha_mode_ignores_invalid_logits():
    """Invalid tokens stay out of MSL + alpha: their logits cannot change the loss."""
    b = make_batch(seed=10)
    logits = (b.hidden @ b.weight.T).double()
    mask = dense_mask(b.valid_ids, V)
    moved = torch.where(mask, logits, logits + 100 * torch.randn_like(logits))
    a = LF.msl_alpha_loss(logits, b.labels, b.valid_ids, V)
    c = LF.msl_alpha_loss(moved, b.labels, b.valid_ids, V)
    torch.testing.assert_close(a, c)
    assert a.item() > LF.msl_loss(logits, b.labels, b.valid_ids).item()  # alpha > 1 on every multi row


def test_alpha_mode_is_full_softmax_when_everything_is_valid():
    b = make_batch(seed=5)
    all_ids = torch.arange(V).expand(len(b.labels), V)
    logits = b.hidden.float() @ b.weight.float().T
    torch.testing.assert_close(LF.msl_alpha_loss(logits, b.labels, all_ids, V), LF.lml_loss(logits, b.labels))


def test_single_choice_positions_are_excluded():
    b = make_batch(seed=6)
    sizes = (b.valid_ids >= 0).sum(1)
    assert (sizes == 1).any() and (sizes > 1).any()
    logits = (b.hidden @ b.weight.T).float()
    keep = sizes > 1
    full = LF.msl_loss(logits[keep], b.labels[keep], b.valid_ids[keep])
    torch.testing.assert_close(LF.msl_loss(logits, b.labels, b.valid_ids), full)
    # no multi-choice position at all: 0, still differentiable
    only = ~keep
    h = b.hidden[only].float().requires_grad_(True)
    out = LF.msl_loss_from_hidden(h, b.weight.float(), b.labels[only], b.valid_ids[only])
    out.backward()
    assert out.item() == 0.0 and torch.equal(h.grad, torch.zeros_like(h))


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_lml_loss_matches_dense(tau):
    b = make_batch(seed=7)

    def ref(h, w):
        logp = torch.log_softmax(h @ w.T / tau, dim=1)
        return -logp.gather(1, b.labels.unsqueeze(1)).mean()

    _check(lambda h, w: LF.lml_loss(h @ w.T, b.labels, tau), ref, b)


def test_valid_probability_matches_dense():
    b = make_batch(seed=8)
    logits = b.hidden @ b.weight.T
    mask = dense_mask(b.valid_ids, V)
    expected = (torch.softmax(logits / 2, dim=1) * mask).sum(1)
    torch.testing.assert_close(LF.valid_probability(logits, b.valid_ids, tau=2.0), expected)


@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("seed", [8, 11])
def test_positive_weight_is_the_papers_w(tau, seed):
    """Fig. 5's w: 1 - P(y) (LML) and 1 - P_valid(y) (MSL), and MSL's is the smaller."""
    b = make_batch(seed=seed, scale=2.0)
    logits = b.hidden @ b.weight.T
    w_lml = LF.positive_weight(logits, b.labels, None, tau)
    w_msl = LF.positive_weight(logits, b.labels, b.valid_ids, tau)
    torch.testing.assert_close(w_lml, dense_w(logits, b.labels, None, tau).float())
    torch.testing.assert_close(w_msl, dense_w(logits, b.labels, b.valid_ids, tau).float())
    # union logits give MSL's w too
    u, label_cols, valid_cols = LF.union_logits(b.hidden, b.weight, b.labels, b.valid_ids)
    torch.testing.assert_close(LF.positive_weight(u, label_cols, valid_cols, tau), w_msl)
    sizes = (b.valid_ids >= 0).sum(1)
    assert torch.all(w_msl[sizes == 1] == 0)
    assert torch.all(w_msl <= w_lml + 1e-6)  # the valid set is a subset of the vocabulary
    assert w_msl[sizes > 1].mean() < w_lml[sizes > 1].mean()
    # not the invalid mass (what the framework logged as w before)
    assert not torch.allclose(w_lml, 1 - LF.valid_probability(logits, b.valid_ids, tau).float(), atol=1e-3)


# ------------------------------------------------------------------ ATS


@pytest.mark.parametrize("seed", range(5))
def test_ats_roots_solve_the_quadratic(seed):
    g = torch.Generator().manual_seed(seed)
    valid = torch.randn(200, generator=g, dtype=torch.float64) * (0.5 + seed)
    pos = valid.max() + torch.rand(8, generator=g, dtype=torch.float64) * 3
    m, eta = 50.0 + 20 * seed, 0.25
    plus = LF.ats_temperature(pos, valid, m, eta, "plus")
    minus = LF.ats_temperature(pos, valid, m, eta, "minus")
    c, gap, var = math.log(m * eta), (pos.mean() - valid.mean()).item(), valid.var().item()
    assert gap * gap - 2 * c * var > 0  # real roots for this construction
    for tau in (plus.item(), minus.item()):
        assert abs(c * tau * tau - gap * tau + var / 2) < 1e-9 * max(1.0, gap * tau)
    assert minus.item() <= plus.item()
    # Vieta: product of the roots is var / (2C), sum is gap / C
    assert plus.item() * minus.item() == pytest.approx(var / (2 * c), rel=1e-9)
    assert plus.item() + minus.item() == pytest.approx(gap / c, rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_ats_positions_widest_is_brute_force(seed):
    b = make_batch(num_seqs=7, positions=5, seed=seed)
    sizes = (b.valid_ids >= 0).sum(1).tolist()
    expected = torch.zeros(len(sizes), dtype=torch.bool)
    for s in range(b.num_sequences):
        rows = [i for i in range(len(sizes)) if int(b.seq_index[i]) == s]
        best = rows[0]
        for i in rows:
            if sizes[i] > sizes[best]:
                best = i
        expected[best] = True
    got = LF.ats_positions(b.first, b.valid_ids, b.seq_index, b.num_sequences, "widest")
    assert torch.equal(got, expected)
    assert torch.equal(LF.ats_positions(b.first, b.valid_ids, b.seq_index, b.num_sequences, "root"), b.first)
    with pytest.raises(ValueError):
        LF.ats_positions(b.first, b.valid_ids, b.seq_index, b.num_sequences, "middle")


def test_ats_positions_widest_ties_take_the_first():
    valid_ids = torch.tensor([[1, 2, -1], [3, 4, -1], [5, -1, -1], [6, -1, -1], [7, 8, 9], [1, -1, -1]])
    seq_index = torch.tensor([0, 0, 0, 1, 1, 1])
    first = torch.tensor([True, False, False, True, False, False])
    got = LF.ats_positions(first, valid_ids, seq_index, 2, "widest")
    assert got.tolist() == [True, False, False, False, True, False]


def test_ats_negative_discriminant_gives_double_root():
    gap, var, m, eta = 1.0, 10.0, 100.0, 0.25
    c = math.log(m * eta)
    assert gap * gap - 2 * c * var < 0
    for root in ("plus", "minus"):
        assert LF.ats_root(torch.tensor(gap), torch.tensor(var), m, eta, root).item() == pytest.approx(gap / (2 * c))
    with pytest.raises(ValueError):
        LF.ats_root(torch.tensor(gap), torch.tensor(var), m, eta, "both")


# ------------------------------------------------------------------ S-DPO


def test_sdpo_loss_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    pp, rp = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    pn, rn = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    for beta in (1.0, 0.3):
        direct = -torch.log(torch.sigmoid(-torch.log(torch.exp(beta * ((pn - rn) - (pp - rp)[:, None])).sum(1))))
        torch.testing.assert_close(LF.sdpo_loss(pp, pn, rp, rn, beta), direct.mean())


def test_sdpo_loss_no_overflow():
    pp = torch.tensor([0.0, -1e4], requires_grad=True)
    pn = torch.tensor([[-1e4, -2e4, 0.0], [1e4, 0.0, 5.0]], requires_grad=True)
    zeros_p, zeros_n = torch.zeros(2), torch.zeros(2, 3)
    loss = LF.sdpo_loss(pp, pn, zeros_p, zeros_n)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pp.grad).all() and torch.isfinite(pn.grad).all()
    # sample 0: z = log(e^-1e4 + e^-2e4 + 1) ~ 0 -> softplus(0) = log 2; sample 1: z ~ 2e4
    assert loss.item() == pytest.approx((math.log(2) + 2e4) / 2, rel=1e-6)


def test_sequence_logps_matches_dense():
    b = make_batch(seed=9)

    def ref(h, w):
        logp = torch.log_softmax(h @ w.T, dim=1).gather(1, b.labels.unsqueeze(1)).squeeze(1)
        out = torch.stack([logp[b.seq_index == s].sum() for s in range(b.num_sequences)])
        return (out * torch.arange(1, b.num_sequences + 1)).sum()  # weight sequences differently

    fn = lambda h, w: (LF.sequence_logps(h, w, b.labels, b.seq_index, b.num_sequences)
                       * torch.arange(1, b.num_sequences + 1)).sum()
    _check(fn, ref, b, atol=1e-4)
