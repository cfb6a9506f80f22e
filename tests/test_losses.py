"""Every loss against values computed by hand (Python math, not the formulas under test)."""

import math

import pytest
import torch

from draft_opd.learner.losses import (
    bernoulli_forward_kl,
    dflash_sft_loss,
    draft_opd_loss,
    eagle3_sft_loss,
    forward_kl,
    full_forward_kl,
    greedy_conflict_shares,
    k3_reverse_kl,
    topk_forward_kl,
)


def test_bernoulli_forward_kl_by_hand():
    p, q = 0.7, 0.4
    expected = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    got = bernoulli_forward_kl(torch.tensor([math.log(p)]), torch.tensor([math.log(q)]))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    same = torch.tensor([math.log(0.3)])
    assert bernoulli_forward_kl(same, same).item() == pytest.approx(0, abs=1e-7)


def test_k3_by_hand_the_ratio_clamp_and_the_log_prob_floor():
    p, q = 0.2, 0.5
    r = p / q
    for clamp in ("reference", "floor"):
        assert k3_reverse_kl(torch.tensor([math.log(p)]), torch.tensor([math.log(q)]), clamp).item() == pytest.approx(
            (r - 1) - math.log(r), rel=1e-5
        )
    # reference: log r = -30 - log 0.5 is clamped to -20; floor: log p = -30 is floored at -10, r = e^-10 / 0.5
    assert k3_reverse_kl(torch.tensor([-30.0]), torch.tensor([math.log(0.5)])).item() == pytest.approx(
        math.exp(-20) - 1 + 20, rel=1e-5
    )
    r = math.exp(-10) / 0.5
    assert k3_reverse_kl(torch.tensor([-30.0]), torch.tensor([math.log(0.5)]), "floor").item() == pytest.approx(
        (r - 1) - math.log(r), rel=1e-5
    )
    with pytest.raises(ValueError, match="rejected_clamp"):
        k3_reverse_kl(torch.zeros(1), torch.zeros(1), "none")


@pytest.mark.parametrize("clamp", ["reference", "floor"])
def test_rejected_stream_loss_and_gradient_past_the_clamp_by_hand(clamp):
    """One block of width 3, all rejected, decay 0.8: (p, q) = (0.2, 0.5), log p = -12 and -30 with q = 0.5.
    d k3 / d log q = 1 - r. Reference: log r = -11.3 and -29.3 give k3 > 10, capped, so those two proposals get
    no gradient. Floor: log p -> -10, k3 = 8.31 < 10, so both are pushed down in full (weight 1 - r)."""
    decay, lq = 0.8, math.log(0.5)
    teacher = torch.tensor([[math.log(0.2), -12.0, -30.0]])
    student = torch.full((1, 3), lq, requires_grad=True)
    weights = [1.0, decay, decay**2]
    r0 = 0.2 / 0.5
    k3_0 = r0 - 1 - math.log(r0)
    if clamp == "reference":
        k3s, dk3 = [k3_0, 10.0, 10.0], [1 - r0, 0.0, 0.0]
    else:
        r = math.exp(-10 - lq)
        k3s, dk3 = [k3_0, r - 1 - math.log(r), r - 1 - math.log(r)], [1 - r0, 1 - r, 1 - r]
    total = sum(weights)
    out = draft_opd_loss(
        torch.zeros(1, 3),
        torch.zeros(1, 3),
        torch.zeros(1, 3),
        teacher,
        student,
        torch.ones(1, 3),
        decay=decay,
        rejected_clamp=clamp,
    )
    assert out["loss"].item() == pytest.approx(sum(w * k for w, k in zip(weights, k3s)) / total, rel=1e-5)
    out["loss"].backward()
    expected_grad = [w * d / total for w, d in zip(weights, dk3)]
    assert student.grad[0].tolist() == pytest.approx(expected_grad, rel=1e-5, abs=1e-9)
    if clamp == "reference":
        assert student.grad[0, 1:].abs().max().item() == 0.0
    else:
        assert student.grad[0, 1:].abs().min().item() > 0.2  # w (1 - r) / sum w


def test_greedy_conflict_shares_by_hand():
    """rej_p_gt_q counts valid rejected entries with p > q (2 of 3), resp_q_gt_p valid response entries with
    q > p (1 of 4); masked-out entries that would count are ignored."""
    log = math.log
    resp_t = torch.tensor([[log(0.9), log(0.5), log(0.4)], [log(0.7), log(0.2), log(0.6)]])
    resp_s = torch.tensor([[log(0.5), log(0.6), log(0.1)], [log(0.7), log(0.9), log(0.8)]])
    resp_mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rej_t = torch.tensor([[log(0.3), log(0.1), log(0.2)], [log(0.5), log(1e-3), log(0.4)]])
    rej_s = torch.tensor([[log(0.2), log(0.4), log(0.1)], [log(0.1), log(0.5), log(0.5)]])
    rej_mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    shares = greedy_conflict_shares(resp_t, resp_s, resp_mask, rej_t, rej_s, rej_mask)
    assert shares["rej_p_gt_q"].item() == pytest.approx(2 / 3)
    assert shares["resp_q_gt_p"].item() == pytest.approx(1 / 4)
    empty = greedy_conflict_shares(resp_t, resp_s, torch.zeros(2, 3), rej_t, rej_s, torch.zeros(2, 3))
    assert empty["rej_p_gt_q"].item() == 0.0 and empty["resp_q_gt_p"].item() == 0.0


def test_draft_opd_loss_weights_and_normalisation_by_hand():
    # two blocks of width 3. Block 0: accept 1 -> response offsets 1 (accepted) and 2 (bonus); rejected 2, 3.
    # Block 1: accept 3 (all) -> response offsets 1, 2, 3; nothing rejected.
    tp = [[0.9, 0.6, 0.0], [0.8, 0.5, 0.3]]  # teacher prob of the response tokens
    sp = [[0.5, 0.2, 0.0], [0.6, 0.5, 0.1]]  # student prob of the same
    resp_mask = [[1, 1, 0], [1, 1, 1]]
    rtp = [[0.0, 0.05, 0.1], [0.0, 0.0, 0.0]]  # teacher prob of the rejected proposals
    rsp = [[0.0, 0.4, 0.3], [0.0, 0.0, 0.0]]  # student prob of them
    rej_mask = [[0, 1, 1], [0, 0, 0]]
    decay = 0.8

    def bern(p, q):
        return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))

    def k3(p, q):
        return p / q - 1 - math.log(p / q)

    resp = sum(bern(tp[n][j], sp[n][j]) for n in range(2) for j in range(3) if resp_mask[n][j])
    rej = sum(decay**j * k3(rtp[0][j], rsp[0][j]) for j in (1, 2))
    expected = (resp + rej) / (5 + decay**1 + decay**2)

    def logp(x):
        return torch.tensor(x).clamp_min(1e-30).log()

    out = draft_opd_loss(
        logp(tp),
        logp(sp),
        torch.tensor(resp_mask, dtype=torch.float32),
        logp(rtp),
        logp(rsp),
        torch.tensor(rej_mask, dtype=torch.float32),
        decay=decay,
    )
    assert out["loss"].item() == pytest.approx(expected, rel=1e-4)
    assert out["rej_kl"].item() == pytest.approx(rej / (decay + decay**2), rel=1e-4)
    half = draft_opd_loss(
        logp(tp),
        logp(sp),
        torch.tensor(resp_mask, dtype=torch.float32),
        logp(rtp),
        logp(rsp),
        torch.tensor(rej_mask, dtype=torch.float32),
        decay=decay,
        rejected_weight=0.5,
    )
    assert half["loss"].item() == pytest.approx((resp + 0.5 * rej) / (5 + 0.5 * (decay + decay**2)), rel=1e-4)
    anchors_only = draft_opd_loss(
        logp(tp),
        logp(sp),
        torch.tensor(resp_mask, dtype=torch.float32),
        logp(rtp),
        logp(rsp),
        torch.tensor(rej_mask, dtype=torch.float32),
        decay=decay,
        rejected_weight=0.0,
    )
    assert anchors_only["loss"].item() == pytest.approx(resp / 5, rel=1e-4)


def test_greedy_response_kl_is_cross_entropy_on_the_committed_tokens_by_hand():
    """response_kl=greedy: -log q per committed token (no floor, no cap), the rejected stream as before."""
    resp_q = [[0.5, 1e-6], [0.25, 0.0]]
    resp_mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    rej_p, rej_q = torch.tensor([[0.1, 0.2], [0.3, 0.4]]), torch.tensor([[0.5, 0.4], [0.6, 0.2]])
    rej_mask = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    teacher = torch.full((2, 2), -0.1)  # ignored by the greedy response KL
    student = torch.tensor(resp_q).clamp_min(1e-30).log().requires_grad_()
    out = draft_opd_loss(
        teacher, student, resp_mask, rej_p.log(), rej_q.log(), rej_mask, decay=0.5, response_kl="greedy"
    )
    ce = -math.log(0.5) - math.log(1e-6) - math.log(0.25)  # 14.5: past the Bernoulli cap, kept in full
    k3 = [(p / q - 1 - math.log(p / q)) for p, q in ((0.2, 0.4), (0.3, 0.6), (0.4, 0.2))]
    weights = [0.5, 1.0, 0.5]
    expected = (ce + sum(w * v for w, v in zip(weights, k3))) / (3 + sum(weights))
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert out["resp_kl"].item() == pytest.approx(ce / 3, rel=1e-5)
    out["loss"].backward()
    denominator = 3 + sum(weights)
    assert student.grad.flatten().tolist() == pytest.approx([-1 / denominator] * 3 + [0.0], rel=1e-5)
    with pytest.raises(ValueError, match="bernoulli"):
        draft_opd_loss(teacher, student, resp_mask, rej_p.log(), rej_q.log(), rej_mask, response_kl="kl")


def test_draft_opd_per_token_loss_is_capped():
    big = draft_opd_loss(
        torch.tensor([[0.0]]),
        torch.tensor([[-10.0]]),
        torch.ones(1, 1),
        torch.tensor([[0.0]]),
        torch.tensor([[-10.0]]),
        torch.ones(1, 1),
    )
    assert big["loss"].item() == pytest.approx(10.0, rel=1e-5)


def test_dflash_sft_loss_decay_weights_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]]])  # [1, W=3, V=3]
    labels = torch.tensor([[0, 0, 2]])
    mask = torch.tensor([[1, 1, 0]])

    def ce(row, label):
        return -(row[label] - math.log(sum(math.exp(v) for v in row)))

    gamma = 7.0
    w = [math.exp(-k / gamma) for k in range(3)]
    rows = logits[0].tolist()
    expected = (w[0] * ce(rows[0], 0) + w[1] * ce(rows[1], 0)) / (w[0] + w[1])
    assert dflash_sft_loss(logits, labels, mask, gamma).item() == pytest.approx(expected, rel=1e-5)


def test_eagle3_sft_loss_averages_each_step_then_weights_it_by_hand():
    """Two blocks, two steps; the second block's step 2 is masked, so step 2 averages one row, not two."""
    logits = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[0.5, 0.5], [3.0, 0.0]]])
    labels = torch.tensor([[0, 1], [1, 0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])

    def ce(row, label):
        return math.log(sum(math.exp(v) for v in row)) - row[label]

    step1 = (ce([1.0, 0.0], 0) + ce([0.5, 0.5], 1)) / 2
    step2 = ce([0.0, 2.0], 1)
    assert eagle3_sft_loss(logits, labels, mask, decay=0.8).item() == pytest.approx(step1 + 0.8 * step2, rel=1e-5)


def test_forward_kl_by_hand():
    p, q = [0.5, 0.5, 0.0], [0.25, 0.5, 0.25]
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.5)  # 0 log 0 = 0
    teacher = torch.tensor([p]).log()  # log 0 = -inf: no NaN
    assert forward_kl(teacher, torch.tensor([q]).log()).item() == pytest.approx(expected, rel=1e-5)
    mask = torch.tensor([[1.0, 0.0]])
    two = torch.stack([teacher, torch.tensor([[0.9, 0.05, 0.05]]).log()], dim=1)  # [1, W=2, V]
    student = torch.tensor([q, q]).log()[None]
    assert full_forward_kl(two, student, mask).item() == pytest.approx(expected, rel=1e-5)  # the masked one is out


@pytest.mark.parametrize("loss", [dflash_sft_loss, eagle3_sft_loss])
def test_soft_labels_of_one_hot_teachers_are_the_hard_labels_and_a_soft_teacher_is_kl_by_hand(loss):
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.5, 0.5, 1.0], [3.0, 0.0, 0.0]]])
    labels = torch.tensor([[0, 2], [1, 0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    one_hot = torch.nn.functional.one_hot(labels, 3).float().log()
    assert loss(logits, labels, mask, teacher_logp=one_hot).item() == pytest.approx(
        loss(logits, labels, mask).item(), rel=1e-6
    )
    # one block, one position, p = [0.7, 0.2, 0.1]: KL(p || softmax(logits)) by hand, whatever the label
    p = [0.7, 0.2, 0.1]
    row = [2.0, 0.0, 0.0]
    lq = [v - math.log(sum(math.exp(u) for u in row)) for v in row]
    expected = sum(pi * (math.log(pi) - lqi) for pi, lqi in zip(p, lq))
    got = loss(torch.tensor([[row]]), torch.tensor([[1]]), torch.ones(1, 1), teacher_logp=torch.tensor([[p]]).log())
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_topk_forward_kl_by_hand():
    q = [0.2, 0.2, 0.6]
    lq = torch.tensor([[q]]).log()
    mask = torch.ones(1, 1)
    # top-2 of p = tokens 0, 1, renormalised to 5/8, 3/8
    ids = torch.tensor([[[0, 1]]])
    topk = torch.tensor([[[math.log(0.5), math.log(0.3)]]])
    expected = 5 / 8 * math.log((5 / 8) / 0.2) + 3 / 8 * math.log((3 / 8) / 0.2)
    assert topk_forward_kl(topk, ids, lq, mask).item() == pytest.approx(expected, rel=1e-5)


def test_topk_total_variation_by_hand():
    from draft_opd.learner.losses import topk_total_variation

    # teacher top-2 = tokens 0, 2 with probs 0.6, 0.2 -> renormalised 0.75, 0.25; student q = [0.5, 0.3, 0.2]
    ids = torch.tensor([[[0, 2]]])
    topk = torch.tensor([[[math.log(0.6), math.log(0.2)]]])
    lq = torch.tensor([[[0.5, 0.3, 0.2]]]).log()
    expected = 0.5 * (abs(0.75 - 0.5) + abs(0.25 - 0.2) + 0.3)
    assert topk_total_variation(topk, ids, lq, torch.ones(1, 1)).item() == pytest.approx(expected, rel=1e-5)
