"""Training-time replay re-drafts exactly what the drafter proposed at rollout time."""

import pytest
import torch

from draft_opd.speculative.decode import DecodeConfig, generate
from tests.conftest import make_drafter
from tests.test_decode import PartlyRightDrafter, prompt_of


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_replay_logits_equal_the_rollout_proposal_logits(tiny_target, kind):
    prompt = prompt_of(12, seed=11)
    plain = generate(tiny_target, prompt, None, DecodeConfig(max_new_tokens=40))
    drafter = make_drafter(tiny_target, kind, 6)
    helped = PartlyRightDrafter(drafter, [plain], seed=5)
    spec = generate(tiny_target, prompt, helped, DecodeConfig(max_new_tokens=40))
    full = torch.tensor(spec.tokens)
    features = tiny_target.forward(full, 0, None).features
    anchors = torch.tensor([position for position, _ in helped.proposals])
    width = 5
    if kind == "dflash":
        replayed = drafter(features, full, anchors, torch.zeros(len(anchors), width - 1, dtype=torch.long))
    else:  # replay the chain on the proposals the inner drafter made (its own argmax)
        chain = torch.stack(
            [logits.argmax(-1)[: width - 1] for _, logits in helped.proposals if logits.shape[0] == width]
        )
        anchors = anchors[: chain.shape[0]]
        replayed = drafter(features, full, anchors, chain)
    for i in range(anchors.shape[0]):
        logits = helped.proposals[i][1]
        torch.testing.assert_close(replayed[i, : logits.shape[0]], logits, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_replay_of_the_last_block_cut_by_max_new_tokens_equals_its_proposal(tiny_target, kind):
    """The last block of a trajectory drafts only what max_new_tokens leaves (fewer than B-1 proposals): replayed
    with its recorded width it has the rollout-time logits, where a full-width DFlash block would not (its
    proposals attend to each other)."""
    prompt = prompt_of(12, seed=11)
    plain = generate(tiny_target, prompt, None, DecodeConfig(max_new_tokens=37))
    drafter = make_drafter(tiny_target, kind, 6)
    helped = PartlyRightDrafter(drafter, [plain], seed=5)
    spec = generate(tiny_target, prompt, helped, DecodeConfig(max_new_tokens=37))
    width = 5
    short = [(position, logits) for position, logits in helped.proposals if logits.shape[0] < width]
    assert short, "no block was cut short: pick another seed or max_new_tokens"  # 37 here: 3 and 2 proposals
    full = torch.tensor(spec.tokens)
    features = tiny_target.forward(full, 0, None).features
    anchors = torch.tensor([position for position, _ in short])
    widths = torch.tensor([logits.shape[0] for _, logits in short])
    chain = torch.stack(
        [torch.nn.functional.pad(logits.argmax(-1), (0, width - logits.shape[0]))[: width - 1] for _, logits in short]
    )
    replayed = drafter(features, full, anchors, chain, widths)
    for i, (_, logits) in enumerate(short):
        torch.testing.assert_close(replayed[i, : logits.shape[0]], logits, atol=2e-4, rtol=2e-4)
    if kind == "dflash":
        at_full_width = drafter(features, full, anchors, chain)
        assert not torch.allclose(at_full_width[0, : short[0][1].shape[0]], short[0][1], atol=2e-4, rtol=2e-4)
