"""SASRec, BERT4Rec and their losses (msl_rec.models.sequential, msl_rec.losses.sequential): CPU, no files.

Expected values come from brute force, from a port of the DROS released code (YangZhengyi98/DROS
``SASRecModules_ori.py`` / ``SASRec_bce.py``) written here, or from training on a toy pattern (item i -> i+1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from msl_rec.losses.sequential import BCELoss, CELoss, DROSLoss, dro_term, sample_negatives
from msl_rec.models.sequential import BERT4Rec, SASRec


def right_padded(histories: list[list[int]], width: int, padding_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, width) right-padded history and (B,) lengths."""
    history = torch.full((len(histories), width), padding_index, dtype=torch.long)
    for b, items in enumerate(histories):
        history[b, : len(items)] = torch.tensor(items)
    return history, torch.tensor([len(h) for h in histories])


@pytest.fixture
def one_thread():
    """Tiny models train ~50x faster on one thread than with OpenMP spinning on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


HISTORIES = [[3, 1, 4, 1, 5, 9, 2, 6], [7], [2, 7, 1, 8], [0, 0, 11, 29, 5], [28, 12]]


def toy_windows(num_items: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every window of the pattern item i -> i+1: histories ``s .. s+n-1`` (n = 1..max_len), target ``s+n``."""
    rows = [(list(range(s, s + n)), s + n) for n in range(1, max_len + 1) for s in range(num_items - n)]
    history, lengths = right_padded([h for h, _ in rows], max_len, num_items)
    return history, lengths, torch.tensor([t for _, t in rows])


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter (LayerNorms included) drawn afresh, so a missed weight or bias shows in the scores."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


# ---------------------------------------------------------------------------------------- SASRec
@pytest.fixture
def sasrec() -> SASRec:
    torch.manual_seed(0)
    return randomise(SASRec(num_items=30, max_len=8, hidden=16, num_heads=2, num_blocks=2, dropout=0.0)).eval()


def test_sasrec_scores_do_not_depend_on_padding_width_or_batch(sasrec):
    history, lengths = right_padded(HISTORIES, 8, sasrec.padding_index)
    batch_scores = sasrec(history, lengths)
    assert batch_scores.shape == (len(HISTORIES), 30)
    for b, items in enumerate(HISTORIES):
        for width in sorted({len(items), min(len(items) + 2, 8)}):
            alone = sasrec(*right_padded([items], width, sasrec.padding_index))
            torch.testing.assert_close(alone[0], batch_scores[b], atol=1e-6, rtol=0)


def test_sasrec_is_causal_items_after_the_history_change_nothing(sasrec):
    history, lengths = right_padded(HISTORIES, 8, sasrec.padding_index)
    after = torch.arange(8) >= lengths[:, None]
    filled = torch.where(after, torch.randint(0, 30, history.shape), history)  # real items, not padding
    assert (filled[after] != sasrec.padding_index).all()
    torch.testing.assert_close(sasrec(filled, lengths), sasrec(history, lengths), atol=1e-6, rtol=0)
    # ...while an item inside the history does change the scores (the check can fail)
    changed = history.clone()
    changed[0, 0] = 17
    assert not torch.allclose(sasrec(changed, lengths)[0], sasrec(history, lengths)[0], atol=1e-4)


def released_sasrec_scores(model: SASRec, states: torch.Tensor, len_states: torch.Tensor) -> torch.Tensor:
    """DROS's ``SASRec.forward_eval`` with its ``MultiHeadAttention`` and ``PositionwiseFeedForward``
    (1x1 Conv1d), ported line by line, on ``model``'s weights; blocks repeated as ``model`` stacks them."""
    item_num, num_heads = model.num_items, model.blocks[0].mh_attn.num_heads
    inputs_emb = model.item_embeddings(states)
    inputs_emb = inputs_emb + model.positional_embeddings(torch.arange(states.shape[1]))
    mask = torch.ne(states, item_num).float().unsqueeze(-1)
    seq = inputs_emb * mask
    for block in model.blocks:
        attn, ffn = block.mh_attn, block.feed_forward
        queries, keys = block.ln_1(seq), seq
        hidden_size = queries.shape[-1]
        Q, K, V = attn.linear_q(queries), attn.linear_k(keys), attn.linear_v(keys)
        split_size = hidden_size // num_heads
        Q_ = torch.cat(torch.split(Q, split_size, dim=2), dim=0)
        K_ = torch.cat(torch.split(K, split_size, dim=2), dim=0)
        V_ = torch.cat(torch.split(V, split_size, dim=2), dim=0)
        matmul_output = torch.bmm(Q_, K_.transpose(1, 2)) / hidden_size ** 0.5
        key_mask = torch.sign(torch.abs(keys.sum(dim=-1))).repeat(num_heads, 1)
        key_mask_reshaped = key_mask.unsqueeze(1).repeat(1, queries.shape[1], 1)
        key_paddings = torch.ones_like(matmul_output) * (-2 ** 32 + 1)
        matmul_output_m1 = torch.where(torch.eq(key_mask_reshaped, 0), key_paddings, matmul_output)
        tril = torch.tril(torch.ones_like(matmul_output[0, :, :]))
        causality_mask = tril.unsqueeze(0).repeat(matmul_output.shape[0], 1, 1)
        causality_paddings = torch.ones_like(causality_mask) * (-2 ** 32 + 1)
        matmul_output_m2 = torch.where(torch.eq(causality_mask, 0), causality_paddings, matmul_output_m1)
        matmul_output_sm = torch.softmax(matmul_output_m2, dim=-1)
        query_mask = torch.sign(torch.abs(queries.sum(dim=-1))).repeat(num_heads, 1)
        query_mask = query_mask.unsqueeze(-1).repeat(1, 1, keys.shape[1])
        output_ws = torch.bmm(matmul_output_sm * query_mask, V_)
        mh_attn_out = torch.cat(torch.split(output_ws, output_ws.shape[0] // num_heads, dim=0), dim=2) + queries
        # PositionwiseFeedForward: Conv1d(d, d, 1) on (N, C, T)
        x = block.ln_2(mh_attn_out)
        out = x.transpose(1, 2)
        out = F.conv1d(F.relu(F.conv1d(out, ffn.w_1.weight[..., None], ffn.w_1.bias)),
                       ffn.w_2.weight[..., None], ffn.w_2.bias)
        ff_out = ffn.layer_norm(out.transpose(1, 2) + x)
        seq = ff_out * mask
    ff_out = model.ln_3(seq)
    state_hidden = torch.stack([ff_out[i, len_states[i] - 1, :] for i in range(ff_out.shape[0])])  # extract_axis_1
    return model.s_fc(state_hidden)


@pytest.mark.parametrize(("num_heads", "num_blocks"), [(1, 1), (2, 1), (4, 2)])
def test_sasrec_equals_a_port_of_the_released_code(num_heads, num_blocks):
    torch.manual_seed(1)
    model = randomise(SASRec(num_items=30, max_len=8, hidden=16, num_heads=num_heads, num_blocks=num_blocks,
                             dropout=0.1)).eval()
    history, lengths = right_padded(HISTORIES, 8, model.padding_index)  # the released width: max_len
    with torch.no_grad():
        torch.testing.assert_close(model(history, lengths), released_sasrec_scores(model, history, lengths),
                                   atol=1e-5, rtol=0)


def test_sasrec_scores_are_the_state_times_each_items_output_row(sasrec):
    history, lengths = right_padded(HISTORIES, 8, sasrec.padding_index)
    state, scores = sasrec.encode(history, lengths), sasrec(history, lengths)
    assert state.shape == (len(HISTORIES), 16)
    weight, bias = sasrec.s_fc.weight, sasrec.s_fc.bias
    brute = torch.stack([torch.stack([state[b] @ weight[i] + bias[i] for i in range(30)])
                         for b in range(len(HISTORIES))])
    torch.testing.assert_close(scores, brute, atol=1e-6, rtol=0)
    assert sasrec.item_embeddings.weight.shape == (31, 16)  # items + padding row, what LLaRA reads


def test_sasrec_train_scores_are_one_row_per_window(sasrec):
    history, lengths = right_padded(HISTORIES, 8, sasrec.padding_index)
    targets = torch.arange(len(HISTORIES))
    scores, out_targets = sasrec.train_scores({"history": history, "lengths": lengths, "targets": targets})
    torch.testing.assert_close(scores, sasrec(history, lengths))
    assert torch.equal(out_targets, targets)


@pytest.mark.parametrize("model_cls", [SASRec, BERT4Rec])
def test_bad_batches_are_errors_naming_the_problem(model_cls):
    model = model_cls(num_items=30, max_len=8, hidden=16, num_heads=2)
    history, lengths = right_padded(HISTORIES, 8, 30)
    left_padded = torch.flip(history, dims=[1])
    with pytest.raises(ValueError, match="right-padded"):
        model(left_padded, lengths)
    with pytest.raises(ValueError, match="lengths outside"):
        model(history, torch.zeros_like(lengths))
    with pytest.raises(ValueError, match="max_len=8"):
        model(torch.zeros(2, 9, dtype=torch.long), torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"lengths \(B,\)"):
        model(history, lengths[:2])
    with pytest.raises(ValueError, match="hidden=10 must be a multiple of num_heads=3"):
        model_cls(num_items=30, hidden=10, num_heads=3)


def test_sasrec_trained_with_bce_ranks_the_next_item_first(one_thread):
    torch.manual_seed(0)
    num_items, max_len = 20, 5
    history, lengths, targets = toy_windows(num_items, max_len)
    model = SASRec(num_items, max_len=max_len, hidden=32, num_heads=1, dropout=0.1)
    loss_fn, optimizer = BCELoss(), torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss, _ = loss_fn(*model.train_scores({"history": history, "lengths": lengths, "targets": targets}))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        top = model.eval()(history, lengths).argmax(1)
    assert (top == targets).float().mean() == 1.0, (top != targets).nonzero().flatten().tolist()


# -------------------------------------------------------------------------------------- BERT4Rec
@pytest.fixture
def bert4rec() -> BERT4Rec:
    torch.manual_seed(0)
    return randomise(BERT4Rec(num_items=30, max_len=8, hidden=16, num_heads=2, num_blocks=2, inner=32,
                              dropout=0.0, attn_dropout=0.0)).eval()


def test_bert4rec_forward_equals_each_row_alone_unpadded(bert4rec):
    history, lengths = right_padded(HISTORIES, 8, bert4rec.padding_index)
    scores = bert4rec(history, lengths)
    assert scores.shape == (len(HISTORIES), 30)
    for b, items in enumerate(HISTORIES):
        alone = bert4rec(torch.tensor([items]), torch.tensor([len(items)]))  # the sequence + [MASK], no padding
        torch.testing.assert_close(alone[0], scores[b], atol=1e-5, rtol=0)
    # bidirectional: what lies after the history is masked by ``lengths``, not read
    after = torch.arange(8) >= lengths[:, None]
    filled = torch.where(after, torch.randint(0, 30, history.shape), history)
    torch.testing.assert_close(bert4rec(filled, lengths), scores, atol=1e-6, rtol=0)


def test_bert4rec_output_is_tied_to_the_item_embeddings(bert4rec):
    history, lengths = right_padded(HISTORIES, 8, bert4rec.padding_index)
    before = bert4rec(history, lengths)
    with torch.no_grad():
        bert4rec.item_embeddings.weight[5] += 1.0  # item 5 is in no history: only its output score moves
    after = bert4rec(history, lengths)
    others = torch.arange(30) != 5
    torch.testing.assert_close(after[:, others], before[:, others])
    assert (after[:, 5] - before[:, 5]).abs().min() > 1e-3


def cloze_batch(num_rows: int, max_len: int, num_items: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    histories = [rng.integers(0, num_items, rng.integers(1, max_len + 1)).tolist() for _ in range(num_rows)]
    history, lengths = right_padded(histories, max_len, num_items)
    targets = torch.from_numpy(rng.integers(0, num_items, num_rows))
    sequence = torch.full((num_rows, max_len + 1), num_items, dtype=torch.long)  # history + target, padded
    for b, items in enumerate(histories):
        sequence[b, : len(items) + 1] = torch.tensor([*items, int(targets[b])])
    return {"history": history, "lengths": lengths, "targets": targets}, sequence


def test_bert4rec_cloze_masks_about_mask_prob_of_real_positions_and_targets_are_the_originals(bert4rec):
    batch, sequence = cloze_batch(4000, 8, 30)
    real = sequence != bert4rec.padding_index
    masked = bert4rec.cloze_mask(real, batch["lengths"], torch.Generator().manual_seed(7))
    assert not (masked & ~real).any()  # never padding
    assert masked.any(1).all()  # every row trains
    # E[masked] per row of n real positions: n p, plus the target when nothing was drawn ((1 - p)^n)
    n, p = real.sum(1).double(), bert4rec.mask_prob
    expected = (n * p + (1 - p) ** n).sum() / n.sum()
    observed = masked.sum() / real.sum()
    assert abs(observed - expected) < 0.01, (observed, expected)  # 0.26 here: many short rows
    # train_scores with the same generator seed masks the same positions; targets are the original items there
    scores, targets = bert4rec.train_scores(batch, torch.Generator().manual_seed(7))
    assert scores.shape == (int(masked.sum()), 30)
    assert torch.equal(targets, sequence[masked])


def test_bert4rec_training_row_with_only_the_target_masked_is_the_eval_forward(bert4rec):
    """With ``mask_prob`` ~ 0 every row masks its target only: the input is history + [MASK], as evaluated."""
    bert4rec.mask_prob = 1e-12
    batch, _ = cloze_batch(6, 8, 30, seed=3)
    scores, targets = bert4rec.train_scores(batch, torch.Generator().manual_seed(0))
    assert torch.equal(targets, batch["targets"])
    torch.testing.assert_close(scores, bert4rec(batch["history"], batch["lengths"]), atol=1e-6, rtol=0)


def test_bert4rec_trained_with_cloze_ranks_the_next_item_first(one_thread):
    torch.manual_seed(0)
    num_items, max_len = 20, 5
    history, lengths, targets = toy_windows(num_items, max_len)
    batch = {"history": history, "lengths": lengths, "targets": targets}
    model = BERT4Rec(num_items, max_len=max_len, hidden=32, num_heads=2, num_blocks=2, inner=64, dropout=0.1,
                     attn_dropout=0.1)
    loss_fn, optimizer = CELoss(), torch.optim.Adam(model.parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        loss, _ = loss_fn(*model.train_scores(batch, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        top = model.eval()(history, lengths).argmax(1)
    assert (top == targets).float().mean() == 1.0, (top != targets).nonzero().flatten().tolist()


# ----------------------------------------------------------------------------------------- losses
def scores_and_targets(rows: int = 12, items: int = 9, scale: float = 2.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, items, generator=g) * scale, torch.randint(0, items, (rows,), generator=g)


def test_ce_loss_is_cross_entropy():
    scores, targets = scores_and_targets()
    loss, metrics = CELoss()(scores, targets)
    torch.testing.assert_close(loss, F.cross_entropy(scores, targets))
    assert metrics["loss"] == pytest.approx(loss.item())


def test_negatives_are_uniform_over_the_other_items_and_never_the_target():
    torch.manual_seed(0)
    num_items = 7
    targets = torch.arange(num_items).repeat_interleave(3000)
    negatives = sample_negatives(targets, num_items, 4)
    assert negatives.shape == (len(targets), 4)
    assert not (negatives == targets[:, None]).any()
    for t in range(num_items):
        counts = torch.bincount(negatives[targets == t].flatten(), minlength=num_items).double()
        share = counts / counts.sum()
        others = torch.arange(num_items) != t
        assert share[t] == 0
        assert (share[others] - 1 / (num_items - 1)).abs().max() < 0.02, share


@pytest.mark.parametrize("num_negatives", [1, 3])
def test_bce_loss_is_the_hand_computed_mean_over_positives_and_negatives(num_negatives):
    scores, targets = scores_and_targets()
    torch.manual_seed(5)
    loss, _ = BCELoss(num_negatives)(scores, targets)
    torch.manual_seed(5)
    negatives = sample_negatives(targets, scores.shape[1], num_negatives)
    terms = [-F.logsigmoid(scores[b, targets[b]]) for b in range(len(targets))]
    terms += [-F.logsigmoid(-scores[b, j]) for b in range(len(targets)) for j in negatives[b]]
    assert len(terms) == len(targets) * (1 + num_negatives)
    torch.testing.assert_close(loss, torch.stack(terms).mean(), atol=1e-6, rtol=0)


def released_dros_loss(model_output, target, target_neg, counts, alpha, beta):
    """``SASRec_bce.py``'s training step from ``model_output`` on, line by line (ps as released: numpy
    float64, so the DRO term runs in float64)."""
    pop = counts.numpy()
    ps = pop + 1
    ps = ps / np.sum(ps)
    ps = np.power(ps, 0.05)
    ps = torch.tensor(ps)
    batch_size = len(target)
    target = target.view(batch_size, 1)
    target_neg = target_neg.view(batch_size, 1)
    pos_scores = torch.gather(model_output, 1, target)
    neg_scores = torch.gather(model_output, 1, target_neg)
    scores = torch.cat((pos_scores, neg_scores), 0)
    labels = torch.cat((torch.ones((batch_size, 1)), torch.zeros((batch_size, 1))), 0)
    loss = torch.nn.BCEWithLogitsLoss()(scores, labels)
    pos_scores_dro = torch.squeeze(torch.gather(torch.mul(model_output * model_output, ps), 1, target))
    pos_loss_dro = torch.squeeze(torch.gather(torch.mul((model_output - 1) * (model_output - 1), ps), 1, target))
    inner_dro = (torch.sum(torch.exp(torch.mul(model_output * model_output, ps) / beta), 1)
                 - torch.exp(pos_scores_dro / beta) + torch.exp(pos_loss_dro / beta))
    loss_dro = torch.log(inner_dro + 1e-24)
    return loss + alpha * torch.mean(loss_dro), torch.mean(loss_dro)


@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (0.3, 2.5)])
def test_dros_loss_equals_the_released_lines(alpha, beta):
    scores, targets = scores_and_targets(rows=16, items=11)
    counts = torch.tensor([5, 0, 3, 9, 1, 0, 0, 2, 7, 4, 1])
    loss_fn = DROSLoss(alpha=alpha, beta=beta)
    loss_fn.set_item_counts(counts)
    torch.manual_seed(2)
    loss, metrics = loss_fn(scores, targets)
    torch.manual_seed(2)
    negatives = sample_negatives(targets, 11, 1)
    expected, expected_dro = released_dros_loss(scores, targets, negatives[:, 0], counts, alpha, beta)
    torch.testing.assert_close(loss.double(), expected.double(), atol=1e-6, rtol=0)
    assert metrics["dro"] == pytest.approx(expected_dro.item(), abs=1e-6)


def test_dro_term_is_stable_where_the_released_sum_overflows():
    scores, targets = scores_and_targets(rows=4, items=6)
    ps = torch.full((6,), 0.9)
    big = scores * 20  # ps * s^2 well past float32's exp range (~88)
    released = torch.log(torch.exp(ps * big ** 2).sum(1) - torch.exp(ps[targets] * big.gather(1, targets[:, None])
                                                                      .squeeze(1) ** 2)
                         + torch.exp(ps[targets] * (big.gather(1, targets[:, None]).squeeze(1) - 1) ** 2))
    assert not torch.isfinite(released).all()
    stable = dro_term(big, targets, ps, 1.0)
    assert torch.isfinite(stable).all()
    reference = dro_term(big.double(), targets, ps.double(), 1.0)  # float64 logsumexp
    torch.testing.assert_close(stable.double(), reference, rtol=1e-6, atol=0)


def test_dros_with_alpha_zero_is_bce():
    scores, targets = scores_and_targets()
    dros = DROSLoss(alpha=0.0)
    dros.set_item_counts(torch.ones(scores.shape[1]))
    torch.manual_seed(9)
    loss, metrics = dros(scores, targets)
    torch.manual_seed(9)
    bce, _ = BCELoss()(scores, targets)
    assert torch.equal(loss, bce)
    assert metrics["bce"] == pytest.approx(bce.item()) and metrics["dro"] > 0


def test_dros_needs_item_counts_and_matching_shapes():
    scores, targets = scores_and_targets(items=9)
    with pytest.raises(RuntimeError, match="set_item_counts"):
        DROSLoss()(scores, targets)
    dros = DROSLoss()
    dros.set_item_counts(torch.ones(8))
    with pytest.raises(ValueError, match="set_item_counts had 8"):
        dros(scores, targets)
    with pytest.raises(ValueError, match="loss.beta"):
        DROSLoss(beta=0)


@pytest.mark.parametrize("loss_fn", [CELoss(), BCELoss(), DROSLoss()])
def test_losses_refuse_mismatched_shapes(loss_fn):
    if isinstance(loss_fn, DROSLoss):
        loss_fn.set_item_counts(torch.ones(9))
    scores, targets = scores_and_targets(items=9)
    with pytest.raises(ValueError, match=r"\(12, 9\)"):
        loss_fn(scores, targets + 9)  # out of range
    with pytest.raises(ValueError, match="2-D"):
        loss_fn(scores[0], targets[:1])
    with pytest.raises(ValueError, match=r"\(11,\)"):
        loss_fn(scores, targets[:11])
