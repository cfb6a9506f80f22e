"""Training losses, each a small pure function of log-probabilities and masks.

Conventions: `*_logp` are log-probabilities of the token in question, shape [N, W] (N blocks,
W = block width B-1), `mask` selects the valid entries, `offset` is the 1-based position of an
entry inside its block (1 = the token right after the anchor). Teacher = target, student = draft.
"""

from __future__ import annotations

import torch

LOGP_FLOOR = -10.0  # Draft-OPD clamps log-probs here, so a vanishing p or q cannot blow up a ratio
LOSS_CAP = 10.0  # ... and each token's loss here
LOG_RATIO_CLAMP = 20.0  # the reference clamps the rejected stream's log(p/q) here instead of flooring log-probs
REJECTED_CLAMPS = ("reference", "floor")
# a token outside a reduced draft vocabulary (logit -inf) gets this student log-prob in OPD's terms, so that a
# masked entry costs 0 (not 0 x inf = NaN) and passes no gradient
UNREACHABLE_LOGP = -1e4
RESPONSE_KLS = ("bernoulli", "greedy")


def block_offsets(width: int, device: torch.device | None = None) -> torch.Tensor:
    """1-based offsets [W] of the positions of a block after its anchor."""
    return torch.arange(1, width + 1, device=device)


def masked_weighted_mean(values: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = weights * mask
    return (values * w).sum() / w.sum().clamp_min(1e-12)


def forward_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last (vocabulary) axis: [..., V] log-probs -> [...]. Its gradient in q is
    cross-entropy's with p as soft labels; it is 0 where q = p."""
    p = teacher_logp.exp()
    return torch.where(p > 0, p * (teacher_logp - student_logp), 0.0).sum(-1)  # 0 log 0 = 0: a one-hot p is CE


def position_loss(
    student_logits: torch.Tensor, labels: torch.Tensor, teacher_logp: torch.Tensor | None = None
) -> torch.Tensor:
    """[N, W] fp32 per-position SFT loss: cross-entropy with the hard labels or, given the teacher's log-probs
    [N, W, V], forward KL to them over the full vocabulary (soft labels). bf16 logits stay bf16 for the hard
    labels (the kernel accumulates in fp32): the softmax over the vocabulary is a third of a bf16 learner's step."""
    if teacher_logp is not None:
        student = torch.log_softmax(student_logits.float(), dim=-1)
        return forward_kl(within_support(teacher_logp, student.isfinite()), student)
    ce = torch.nn.functional.cross_entropy(student_logits.flatten(0, 1), labels.flatten().long(), reduction="none")
    return ce.view_as(labels).float().nan_to_num(posinf=0.0)  # a label outside a reduced draft vocabulary: masked


def within_support(teacher_logp: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """The teacher's log-probs renormalised over `support` [..., V] (a reduced draft vocabulary: the tokens the
    draft can propose); unchanged where the support is the whole vocabulary."""
    return torch.log_softmax(teacher_logp.float().masked_fill(~support, float("-inf")), dim=-1)


def dflash_sft_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 7.0,
    teacher_logp: torch.Tensor | None = None,
) -> torch.Tensor:
    """DFlash: the position loss at block offset k weighted exp(-(k-1)/gamma), normalised by the weights.

    student_logits [N, W, V], labels [N, W] (the token at anchor+k), mask [N, W]; teacher_logp as position_loss.
    """
    width = labels.shape[1]
    weights = torch.exp(-(block_offsets(width, labels.device) - 1) / gamma).expand_as(labels)
    return masked_weighted_mean(position_loss(student_logits, labels, teacher_logp), weights, mask.float())


def eagle3_sft_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    decay: float = 0.8,
    teacher_logp: torch.Tensor | None = None,
) -> torch.Tensor:
    """EAGLE-3 training-time test: the position loss at unroll step i (block offset i + 1), averaged over the
    blocks valid at that step, weighted decay^i and summed over steps.

    student_logits [N, W, V], labels [N, W], mask [N, W]; teacher_logp as position_loss. Each step is averaged
    on its own, so that the later steps, which fewer blocks reach, weigh as EAGLE-3 weighs them and not by how
    many blocks reach them.
    """
    weights = decay ** torch.arange(labels.shape[1], dtype=torch.float32, device=labels.device)
    mask = mask.float()
    per_step = (position_loss(student_logits, labels, teacher_logp) * mask).sum(0) / mask.sum(0).clamp_min(1)
    return (weights * per_step).sum()


def bernoulli_forward_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Local forward KL of the accept/reject event: p log(p/q) + (1-p) log((1-p)/(1-q))."""
    lp, lq = teacher_logp.clamp_min(LOGP_FLOOR), student_logp.clamp_min(LOGP_FLOOR)
    p, q = lp.exp(), lq.exp()
    eps = 1e-6
    return p * (lp - lq) + (1 - p) * (torch.log1p(-p.clamp_max(1 - eps)) - torch.log1p(-q.clamp_max(1 - eps)))


def greedy_forward_kl(student_logp: torch.Tensor) -> torch.Tensor:
    """Forward KL to the target's greedy distribution, a one-hot on its argmax: -log q of the committed token.

    At T = 0 verification accepts a proposal iff it is the target's argmax, so this, not the Bernoulli KL to p,
    is the forward KL that acceptance measures; it never lowers q of a committed token. Not floored nor capped:
    cross-entropy's gradient is bounded, and the tokens the draft rules out most are the ones to raise.
    """
    return -student_logp


def k3_reverse_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor, clamp: str = "reference") -> torch.Tensor:
    """Reverse KL estimated at a student sample with k3: r = p/q, (r - 1) - log r (>= 0, unbiased).

    clamp=reference (the Draft-OPD code): log r clamped to +-LOG_RATIO_CLAMP, so a proposal the teacher
    all but rules out gets a k3 past LOSS_CAP and, once capped, no gradient. clamp=floor: both log-probs
    floored at LOGP_FLOOR first, which keeps such a proposal under the cap and pushes its q down in full.
    """
    if clamp == "reference":
        log_r = (teacher_logp - student_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    elif clamp == "floor":
        log_r = teacher_logp.clamp_min(LOGP_FLOOR) - student_logp.clamp_min(LOGP_FLOOR)
    else:
        raise ValueError(f"unknown objective.rejected_clamp {clamp!r}; use one of {REJECTED_CLAMPS}")
    return log_r.exp() - 1 - log_r


def draft_opd_loss(
    resp_teacher_logp: torch.Tensor,
    resp_student_logp: torch.Tensor,
    resp_mask: torch.Tensor,
    rej_teacher_logp: torch.Tensor,
    rej_student_logp: torch.Tensor,
    rej_mask: torch.Tensor,
    decay: float = 0.9,
    rejected_clamp: str = "reference",
    rejected_weight: float = 1.0,
    response_kl: str = "bernoulli",
) -> dict[str, torch.Tensor]:
    """Draft-OPD's decayed asymmetric KL over the response and rejected streams of N blocks ([N, W] each).

    loss = (sum resp_kl + sum w * rej_k3) / (N_resp + sum w), w = rejected_weight * decay^(offset-1), each
    Bernoulli and k3 term capped (a capped term has no gradient); `rejected_clamp` is k3_reverse_kl's `clamp`.
    rejected_weight=0 leaves the response stream alone (the anchors-only ablation). response_kl: bernoulli
    (the paper's) or greedy (greedy_forward_kl, the T = 0 target).
    """
    width = rej_mask.shape[1]
    w = rejected_weight * decay ** (block_offsets(width, rej_mask.device) - 1).float() * rej_mask
    if response_kl == "bernoulli":
        resp = bernoulli_forward_kl(resp_teacher_logp, resp_student_logp).clamp_max(LOSS_CAP) * resp_mask
    elif response_kl == "greedy":
        resp = greedy_forward_kl(resp_student_logp) * resp_mask
    else:
        raise ValueError(f"unknown response KL {response_kl!r}; use one of {RESPONSE_KLS}")
    rej = k3_reverse_kl(rej_teacher_logp, rej_student_logp, rejected_clamp).clamp_max(LOSS_CAP) * w
    denominator = (resp_mask.sum() + w.sum()).clamp_min(1e-12)
    return {
        "loss": (resp.sum() + rej.sum()) / denominator,
        "resp_kl": resp.sum() / resp_mask.sum().clamp_min(1),
        "rej_kl": rej.sum() / w.sum().clamp_min(1e-12),
    }


def greedy_conflict_shares(
    resp_teacher_logp: torch.Tensor,
    resp_student_logp: torch.Tensor,
    resp_mask: torch.Tensor,
    rej_teacher_logp: torch.Tensor,
    rej_student_logp: torch.Tensor,
    rej_mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Shares of the entries where a sampled estimator may push against greedy acceptance (issue 11 (d)).

    rej_p_gt_q: rejected proposals with p > q, where k3's gradient raises q of a token greedy verification
    rejected; resp_q_gt_p: committed tokens with q > p, where the Bernoulli forward KL lowers q of a token
    greedy verification accepts. Diagnostics only: detached, each over its stream's valid entries.
    """

    def share(hit: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return ((hit.float() * mask).sum() / mask.sum().clamp_min(1)).detach()

    return {
        "rej_p_gt_q": share(rej_teacher_logp > rej_student_logp, rej_mask),
        "resp_q_gt_p": share(resp_student_logp > resp_teacher_logp, resp_mask),
    }


def topk_forward_kl(
    teacher_topk_logp: torch.Tensor, teacher_topk_ids: torch.Tensor, student_logp_full: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Exact forward KL(p || q) restricted to the teacher's top-k (p renormalised over it).

    teacher_topk_logp / ids [N, W, k], student_logp_full [N, W, V], mask [N, W].
    """
    lp = torch.log_softmax(teacher_topk_logp.float(), dim=-1)
    kl = forward_kl(lp, student_logp_full.gather(-1, teacher_topk_ids.long()))
    return masked_weighted_mean(kl, torch.ones_like(kl), mask.float())


def full_forward_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Forward KL(p || q) over the full vocabulary, averaged over the mask: teacher_logp / student_logp
    [N, W, V], mask [N, W]."""
    kl = forward_kl(within_support(teacher_logp, student_logp > UNREACHABLE_LOGP), student_logp)
    return masked_weighted_mean(kl, torch.ones_like(kl), mask.float())


def topk_total_variation(
    teacher_topk_logp: torch.Tensor, teacher_topk_ids: torch.Tensor, student_logp_full: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """TV(p, q) with p the teacher's top-k renormalised (zero elsewhere): 1/2 (sum_topk |p - q| + 1 - sum_topk q).

    Acceptance of a draft sample is 1 - TV(p, q), so this is the quantity speculative sampling pays for.
    """
    p = torch.softmax(teacher_topk_logp.float(), dim=-1)
    q = student_logp_full.gather(-1, teacher_topk_ids.long()).exp()
    tv = 0.5 * ((p - q).abs().sum(-1) + (1 - q.sum(-1)).clamp_min(0))
    return masked_weighted_mean(tv, torch.ones_like(tv), mask.float())
