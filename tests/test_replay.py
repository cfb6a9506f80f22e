"""Training-time replay re-drafts exactly what the drafter proposed at rollout time."""

import pytest
import torch

from speculative.decode import DecodeConfig, generate
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
        chain = torch.stack([logits.argmax(-1)[: width - 1] for _, logits in helped.proposals
                             if logits.shape[0] == width])
        anchors = anchors[: chain.shape[0]]
        replayed = drafter(features, full, anchors, chain)
    for i in range(anchors.shape[0]):
        logits = helped.proposals[i][1]
        torch.testing.assert_close(replayed[i, : logits.shape[0]], logits, atol=2e-4, rtol=2e-4)
