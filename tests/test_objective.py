"""Training objectives on real rollouts of the tiny target: gradients, replay alignment, learning."""

import numpy as np
import pytest
import torch

from draft_opd.actors.rollout import RolloutConfig, RolloutWorker
from draft_opd.buffer import BufferConfig, ReplayBuffer
from draft_opd.learner.objective import ObjectiveConfig, phase_loss
from draft_opd.learner.replay import TargetSource, random_text_anchors, replay, replay_random_anchors
from draft_opd.speculative.loading import DraftSpec
from draft_opd.speculative.target import TargetConfig
from draft_opd.speculative.text_tau import leading_matches, text_labels
from tests.conftest import TINY_FEATURE_LAYERS, TINY_MASK


def rollouts(kind: str, n: int = 6, topk: int = 0, off_text: bool = True):
    draft = DraftSpec(
        kind=kind,
        block_size=5,
        num_layers=1,
        target_layer_ids=TINY_FEATURE_LAYERS,
        mask_token_id=TINY_MASK,
        init="random",
    )
    buffer = ReplayBuffer(BufferConfig(topk=topk))
    worker = RolloutWorker(
        TargetConfig(testbed="tiny"),
        draft,
        RolloutConfig(num_prompts=n, max_new_tokens=32, topk_logprobs=topk, off_text_logprobs=off_text),
        0,
        buffer,
    )
    worker.run(n)
    return worker, buffer


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
@pytest.mark.parametrize("phase", ["sft", "opd"])
def test_gradients_reach_only_the_drafts_trainable_parameters(kind, phase):
    worker, buffer = rollouts(kind, 3)
    out = phase_loss(
        phase,
        worker.drafter,
        buffer.sample(8),
        TargetSource(worker.target),
        ObjectiveConfig(),
        np.random.default_rng(0),
    )
    out["loss"].backward()
    grads = [p.grad for p in worker.drafter.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    frozen = [worker.target.embed_tokens.weight, *worker.target.model.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in frozen)


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_replay_teacher_terms_match_the_recorded_stream(kind):
    """At the first rejected position the student's replayed log-prob is the rollout-time q of that proposal."""
    worker, buffer = rollouts(kind, 3)
    batch = buffer.sample(12)
    terms = replay(worker.drafter, batch, TargetSource(worker.target))
    assert torch.equal(
        terms.rejected_mask.bool(),
        torch.from_numpy(batch.rejected_mask)
        & torch.from_numpy(batch.anchor >= (1 if kind == "eagle3" else 0))[:, None],
    )
    # the drafter's argmax at rollout was each proposal: replay must reproduce it where the chain is on-policy
    first_rejected = torch.from_numpy(batch.accept_len.astype(np.int64))
    rows = torch.arange(len(batch))
    valid = first_rejected < torch.from_numpy(batch.n_draft.astype(np.int64))
    proposed = terms.draft_tokens[rows, first_rejected.clamp_max(terms.draft_tokens.shape[1] - 1)]
    replayed_argmax = terms.student_logp[rows, first_rejected.clamp_max(terms.draft_tokens.shape[1] - 1)].argmax(-1)
    assert torch.equal(
        proposed[valid & terms.rejected_mask.any(1).bool()], replayed_argmax[valid & terms.rejected_mask.any(1).bool()]
    )


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
@pytest.mark.parametrize("phase", ["sft", "opd"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(kind, phase):
    worker, buffer = rollouts(kind, 4)
    batch, features = buffer.sample(16), TargetSource(worker.target)
    optimizer = torch.optim.AdamW(worker.drafter.parameters(), lr=1e-3)
    worker.drafter.train()
    losses = []
    for _ in range(15):
        out = phase_loss(phase, worker.drafter, batch, features, ObjectiveConfig(), np.random.default_rng(0))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_topk_variant_learns_and_needs_stored_topk():
    worker, buffer = rollouts("dflash", 4, topk=8)
    batch, features = buffer.sample(16), TargetSource(worker.target)
    cfg = ObjectiveConfig(opd_variant="topk")
    optimizer = torch.optim.AdamW(worker.drafter.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        out = phase_loss("opd", worker.drafter, batch, features, cfg, np.random.default_rng(0))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.8 * losses[0], losses
    halved = phase_loss(
        "opd",
        worker.drafter,
        batch,
        features,
        ObjectiveConfig(opd_variant="topk", rejected_weight=0.5),
        np.random.default_rng(0),
    )
    assert halved["rej_tv"].item() > 0
    assert halved["loss"].item() == pytest.approx(halved["resp_kl"].item() + 0.5 * halved["rej_tv"].item(), rel=1e-5)
    plain_worker, plain_buffer = rollouts("dflash", 2)
    with pytest.raises(ValueError, match="rollout.topk_logprobs"):
        phase_loss("opd", plain_worker.drafter, plain_buffer.sample(4), features, cfg, np.random.default_rng(0))


@pytest.mark.parametrize(
    "cfg",
    [
        ObjectiveConfig(rejected_weight=0),
        ObjectiveConfig(rejected_weight=0, response_kl="greedy"),
        ObjectiveConfig(rejected_weight=0, opd_variant="topk"),
    ],
)
def test_a_response_only_objective_learns_the_same_without_the_off_text_pass(cfg):
    """Rollouts that skip the off-text pass (NaN past each block's first mismatch) give such an objective the same
    loss and gradients; their rejected stream keeps only the recorded first mismatch."""
    results = []
    for off_text in (True, False):
        worker, buffer = rollouts("dflash", 4, topk=8, off_text=off_text)
        batch = buffer.sample(16)
        out = phase_loss("opd", worker.drafter, batch, TargetSource(worker.target), cfg, np.random.default_rng(0))
        out["loss"].backward()
        terms = replay(worker.drafter, batch, TargetSource(worker.target))
        grads = [p.grad.clone() for p in worker.drafter.parameters()]
        results.append((batch, out, terms, grads))
    (full, full_out, full_terms, full_grads), (skipped, out, terms, grads) = results
    assert np.isnan(skipped.draft_logprobs).any() and not np.isnan(full.draft_logprobs).any()
    assert torch.isfinite(out["loss"]) and out["loss"].item() == pytest.approx(full_out["loss"].item(), rel=1e-6)
    for g, f in zip(grads, full_grads):
        torch.testing.assert_close(g, f)
    first_mismatch = torch.arange(full.draft_tokens.shape[1])[None, :] == torch.from_numpy(full.accept_len)[:, None]
    assert torch.equal(terms.rejected_mask, full_terms.rejected_mask * first_mismatch)
    assert terms.rejected_mask.sum() > 0 and full_terms.rejected_mask.sum() > terms.rejected_mask.sum()


def test_sft_draws_its_anchors_per_row_from_the_rows_sampled():
    """sft_anchors_per_row=k: k blocks per sampled block, all in that block's row, labels inside its text."""
    worker, buffer = rollouts("dflash", 3)
    batch = buffer.sample(2)
    features = TargetSource(worker.target)
    one = phase_loss("sft", worker.drafter, batch, features, ObjectiveConfig(), np.random.default_rng(0))
    many = phase_loss(
        "sft", worker.drafter, batch, features, ObjectiveConfig(sft_anchors_per_row=5), np.random.default_rng(0)
    )
    assert one["blocks"].item() == 2 and many["blocks"].item() == 10
    width = worker.drafter.cfg.block_size - 1
    assert 0 < many["tokens"].item() <= 10 * width and many["tokens"].item() > one["tokens"].item()
    with pytest.raises(ValueError, match="sft_anchors_per_row"):
        ObjectiveConfig(sft_anchors_per_row=0)
    with pytest.raises(ValueError, match="objective.opd_blocks_per_row must be >= 1"):
        ObjectiveConfig(opd_blocks_per_row=0)


def test_mixed_loss_adds_the_weighted_sft_loss_of_the_same_rows():
    worker, buffer = rollouts("dflash", 3)
    batch, features = buffer.sample(8), TargetSource(worker.target)
    opd = phase_loss("opd", worker.drafter, batch, features, ObjectiveConfig(), np.random.default_rng(0))
    sft = phase_loss("sft", worker.drafter, batch, features, ObjectiveConfig(), np.random.default_rng(1))
    mixed = phase_loss("opd", worker.drafter, batch, features, ObjectiveConfig(sft_mix=0.5), np.random.default_rng(1))
    assert mixed["sft_loss"].item() == pytest.approx(sft["loss"].item(), rel=1e-5)
    assert mixed["loss"].item() == pytest.approx(opd["loss"].item() + 0.5 * sft["loss"].item(), rel=1e-5)
    with pytest.raises(ValueError, match="rejected_weight and objective.sft_mix"):
        ObjectiveConfig(sft_mix=-1)


def test_greedy_response_kl_is_the_cross_entropy_of_the_committed_tokens():
    """objective.response_kl=greedy with the rejected stream off: the OPD loss is -log q of the target's
    committed (greedy) tokens at the recorded anchors, averaged over the response stream."""
    worker, buffer = rollouts("dflash", 3)
    batch, features = buffer.sample(8), TargetSource(worker.target)
    cfg = ObjectiveConfig(response_kl="greedy", rejected_weight=0)
    out = phase_loss("opd", worker.drafter, batch, features, cfg, np.random.default_rng(0))
    terms = replay(worker.drafter, batch, features)
    ce = -(terms.student_at(terms.committed_tokens) * terms.committed_mask).sum() / terms.committed_mask.sum()
    assert out["loss"].item() == pytest.approx(ce.item(), rel=1e-5)
    with pytest.raises(ValueError, match="response_kl"):
        ObjectiveConfig(response_kl="forward")


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_random_anchor_replay_trains_the_drafts_matching_prefix_and_its_first_error(kind):
    """objective.opd_anchors=random: per sampled block, an anchor drawn in the response of its row; the response
    stream is the draft's greedy matches with the text plus the first error's target token, scored by the
    rollout's teacher log-probs; the target never scored these proposals, so there is no rejected stream."""
    worker, buffer = rollouts(kind, 3)
    batch, features = buffer.sample(12), TargetSource(worker.target)
    optimizer = torch.optim.AdamW(worker.drafter.parameters(), lr=3e-3)
    for step in range(30):  # a draft that matches some of the text, so accepted prefixes vary in length
        out = phase_loss(
            "sft", worker.drafter, batch, features, ObjectiveConfig(sft_anchors_per_row=4), np.random.default_rng(step)
        )
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    optimizer.zero_grad()
    terms = replay_random_anchors(worker.drafter, batch, features, np.random.default_rng(0))
    assert terms.committed_mask.sum(1).max() > 1
    width, lowest = worker.drafter.cfg.block_size - 1, 1 if kind == "eagle3" else 0
    rng, first = np.random.default_rng(0), 0  # the same draws as the replay's
    for t, count in zip(*np.unique(batch.traj_index, return_counts=True)):
        ids = torch.from_numpy(batch.input_ids[t].astype(np.int64))
        anchors = random_text_anchors(batch, t, int(count), lowest, rng)
        assert anchors.min() >= batch.prompt_len[t] - 1 and anchors.max() <= len(ids) - 2
        matches = leading_matches(
            worker.drafter,
            features(batch.input_ids[t], batch.features[t]),
            ids,
            anchors,
            torch.full((int(count),), width),
        )
        recorded = buffer.get(batch.traj_ids[t])
        for i, (anchor, match) in enumerate(zip(anchors.tolist(), matches.tolist())):
            mask = terms.committed_mask[first + i].bool()
            length = min(match + 1, width, len(ids) - 1 - anchor)
            assert mask.tolist() == [j < length for j in range(width)]
            assert terms.committed_tokens[first + i][mask].tolist() == ids[anchor + 1 : anchor + 1 + length].tolist()
            teacher = recorded.committed_logprobs[
                anchor + 1 - recorded.prompt_len : anchor + 1 - recorded.prompt_len + length
            ]
            assert terms.teacher_committed_logp[first + i][mask].tolist() == pytest.approx(list(teacher))
        first += int(count)
    assert first == len(batch) and terms.rejected_mask.sum() == 0
    cfg = ObjectiveConfig(opd_anchors="random")
    out = phase_loss("opd", worker.drafter, batch, features, cfg, np.random.default_rng(0))
    assert torch.isfinite(out["loss"]) and out["loss"].item() == pytest.approx(out["resp_kl"].item(), rel=1e-5)
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in worker.drafter.parameters())
    with pytest.raises(ValueError, match="opd_anchors"):
        ObjectiveConfig(opd_anchors="anywhere")
    with pytest.raises(ValueError, match="opd_variant=k3"):
        ObjectiveConfig(opd_anchors="random", opd_variant="topk")


def test_the_targets_distribution_at_a_blocks_positions_is_that_of_a_fresh_prefix_pass():
    """TargetSource.at_blocks: row j of a block at anchor a is the target's distribution of token a + 1 + j, the
    last row of a pass over that prefix; at T = 0 its argmax is the text's token there (the text is greedy)."""
    worker, buffer = rollouts("dflash", 3)
    batch, source = buffer.sample(4), TargetSource(worker.target)
    width = worker.drafter.cfg.block_size - 1
    for t in np.unique(batch.traj_index):
        ids = torch.from_numpy(batch.input_ids[t].astype(np.int64))
        anchors = random_text_anchors(batch, t, 3, 0, np.random.default_rng(int(t)))
        blocks = source.at_blocks(batch.input_ids[t], anchors, width)
        labels, mask = text_labels(ids, anchors, width)
        assert blocks.shape == (3, width, worker.target.vocab_size) and mask.any()
        assert torch.equal(blocks.argmax(-1)[mask], labels[mask])
        i, j = map(int, mask.nonzero()[-1])  # the last label position of these blocks
        prefix = ids[: int(anchors[i]) + j + 1]
        fresh = torch.log_softmax(worker.target.forward(prefix, 0, None).logits[-1].float(), dim=-1)
        assert torch.allclose(blocks[i, j], fresh, atol=1e-5)


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
@pytest.mark.parametrize(
    "phase,cfg",
    [("sft", ObjectiveConfig(sft_targets="soft")), ("opd", ObjectiveConfig(opd_variant="full", rejected_weight=0))],
    ids=["soft-sft", "full-vocab-opd"],
)
def test_full_vocabulary_teachers_learn_on_a_fixed_batch(kind, phase, cfg):
    worker, buffer = rollouts(kind, 4)
    batch, features = buffer.sample(16), TargetSource(worker.target)
    optimizer = torch.optim.AdamW(worker.drafter.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        out = phase_loss(phase, worker.drafter, batch, features, cfg, np.random.default_rng(0))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert min(losses) >= 0 and losses[-1] < 0.8 * losses[0], losses
    hard = phase_loss(phase, worker.drafter, batch, features, ObjectiveConfig(), np.random.default_rng(0))
    assert hard["loss"].item() != pytest.approx(losses[-1], rel=1e-3)  # the soft teacher is not the hard one


def test_full_vocab_opd_is_the_forward_kl_at_the_committed_positions_of_prefix_passes():
    worker, buffer = rollouts("dflash", 3)
    batch, source = buffer.sample(6), TargetSource(worker.target)
    out = phase_loss("opd", worker.drafter, batch, source, ObjectiveConfig(opd_variant="full", rejected_weight=0), None)
    terms = replay(worker.drafter, batch, source)
    kls = []
    for i, j in terms.committed_mask.nonzero().tolist():
        ids = torch.from_numpy(batch.input_ids[batch.traj_index[i]].astype(np.int64))
        logits = worker.target.forward(ids[: int(batch.anchor[i]) + j + 1], 0, None).logits[-1]
        p = torch.softmax(logits.float(), dim=-1)
        kls.append(float((p * (p.log() - terms.student_logp[i, j].detach())).sum()))
    assert kls and out["loss"].item() == pytest.approx(sum(kls) / len(kls), rel=1e-4)
    assert out["resp_kl"].item() == out["loss"].item()
    with pytest.raises(ValueError, match="rejected_weight=0"):
        ObjectiveConfig(opd_variant="full")
    with pytest.raises(ValueError, match="opd_variant=k3"):
        ObjectiveConfig(opd_anchors="random", opd_variant="full", rejected_weight=0)
    with pytest.raises(ValueError, match="opd_variant must be one of"):
        ObjectiveConfig(opd_variant="tv")
    with pytest.raises(ValueError, match="sft_targets must be one of"):
        ObjectiveConfig(sft_targets="teacher")


def test_tokens_outside_a_reduced_draft_vocabulary_are_masked_never_nan():
    """An EAGLE-3 head over 48 target ids cannot propose the rest: every objective masks such labels (hard SFT,
    OPD's response stream), renormalises soft teachers over the 48, and stays finite, gradients included."""
    from draft_opd.speculative.drafter import DrafterConfig
    from draft_opd.speculative.loading import build_drafter

    worker, buffer = rollouts("eagle3", 3)
    batch, features = buffer.sample(8), TargetSource(worker.target)
    cfg = DrafterConfig(
        kind="eagle3",
        block_size=5,
        num_layers=1,
        target_layer_ids=TINY_FEATURE_LAYERS,
        mask_token_id=TINY_MASK,
        draft_vocab_size=48,
    )
    drafter = build_drafter(cfg, worker.target)
    committed = np.unique(batch.committed_tokens[batch.committed_mask])
    drafter.restrict_vocab(
        torch.from_numpy(np.setdiff1d(np.arange(worker.target.vocab_size), committed[: len(committed) // 2])[:48])
    )
    terms = replay(drafter, batch, features)
    outside = ~torch.isin(terms.committed_tokens, drafter.d2t)
    assert (outside & torch.from_numpy(batch.committed_mask)).any() and not terms.committed_mask[outside].any()
    objectives = [
        ("sft", ObjectiveConfig()),
        ("sft", ObjectiveConfig(sft_targets="soft")),
        ("opd", ObjectiveConfig()),
        ("opd", ObjectiveConfig(response_kl="greedy", rejected_weight=0)),
        ("opd", ObjectiveConfig(opd_variant="full", rejected_weight=0)),
    ]
    for phase, objective in objectives:
        drafter.zero_grad()
        out = phase_loss(phase, drafter, batch, features, objective, np.random.default_rng(0))
        out["loss"].backward()
        assert torch.isfinite(out["loss"]), (phase, objective)
        assert all(torch.isfinite(p.grad).all() for p in drafter.parameters() if p.grad is not None)
