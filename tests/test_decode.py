"""Lossless speculative decoding on the tiny target: output equals plain greedy decoding, records are exact."""

import pytest
import torch

from draft_opd.speculative.decode import DecodeConfig, DecodeResult, generate
from draft_opd.speculative.drafter import Drafter
from tests.conftest import make_drafter


class PartlyRightDrafter:
    """Wraps a real drafter: runs its propose (so its cache and feature bookkeeping are exercised), then
    overwrites a random-length prefix of the proposals with the true greedy continuation. Random drafters
    alone would never be accepted; this makes every accept length from 0 to n occur.

    `references` are the plain greedy decodes of the prompts it may draft for; each sequence draws its
    accept lengths from its own generator (seed + the reference's index), so a sequence is forced alike
    whether it is decoded alone or batched with others."""

    def __init__(self, drafter, references: list[DecodeResult], seed: int = 0):
        self.inner, self.references, self.seed, self.cfg = drafter, references, seed, drafter.cfg
        self.sequences: dict[int, tuple[list[int], torch.Generator]] = {}  # id(state) -> reference, generator
        self.proposals: list[tuple[int, torch.Tensor]] = []

    def begin(self, features, tokens):
        state = self.inner.begin(features, tokens)
        i = next(i for i, ref in enumerate(self.references) if ref.tokens[: ref.prompt_len] == tokens.tolist())
        self.sequences[id(state)] = self.references[i].tokens, torch.Generator().manual_seed(self.seed + i)
        return state

    def extend(self, state, features, tokens, start):
        self.inner.extend(state, features, tokens, start)

    def propose(self, state, anchor, position, n, pick):
        draft, logits = self.inner.propose(state, anchor, position, n, pick)
        self.proposals.append((position, logits))
        reference, rng = self.sequences[id(state)]
        right = int(torch.randint(0, n + 1, (1,), generator=rng))
        truth = torch.tensor(reference[position + 1 : position + 1 + n], dtype=draft.dtype)
        draft = draft.clone()
        draft[: min(right, truth.numel())] = truth[:right]
        return draft, logits

    propose_rows = Drafter.propose_rows  # one propose per row, so every row's proposals are forced as alone


def prompt_of(length: int, seed: int) -> list[int]:
    return torch.randint(0, 250, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("prompt_len", [1, 9, 57])
def test_greedy_speculative_output_equals_plain_greedy(tiny_target, kind, block_size, prompt_len):
    prompt = prompt_of(prompt_len, seed=prompt_len)
    cfg = DecodeConfig(max_new_tokens=48)
    plain = generate(tiny_target, prompt, None, cfg)
    drafter = make_drafter(tiny_target, kind, block_size)
    random_spec = generate(tiny_target, prompt, drafter, cfg)
    assert random_spec.tokens == plain.tokens

    helped = PartlyRightDrafter(drafter, [plain], seed=prompt_len)
    spec = generate(tiny_target, prompt, helped, cfg)
    assert spec.tokens == plain.tokens
    assert spec.num_new_tokens == 48
    if block_size > 1:
        accepts = [s.accept_len for s in spec.steps]
        assert max(accepts) >= 2 and len(set(accepts)) >= 2, accepts
        assert len(spec.steps) < len(plain.steps)


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_incremental_drafting_matches_drafting_from_scratch(tiny_target, kind):
    """The drafter's cached, lazily fed state gives the same proposals as a fresh state built from the
    full committed prefix: the bookkeeping of anchors, features and cache crops is exact."""
    prompt = prompt_of(11, seed=3)
    plain = generate(tiny_target, prompt, None, DecodeConfig(max_new_tokens=40))
    drafter = make_drafter(tiny_target, kind, 6)
    helped = PartlyRightDrafter(drafter, [plain], seed=1)
    generate(tiny_target, prompt, helped, DecodeConfig(max_new_tokens=40))
    for position, logits in helped.proposals[1::3]:
        prefix = torch.tensor(plain.tokens[:position])
        features = tiny_target.forward(prefix, 0, None).features
        state = drafter.begin(features, prefix)
        anchor = torch.tensor(plain.tokens[position])
        _, fresh = drafter.propose(state, anchor, position, logits.shape[0], lambda x: x.argmax(-1))
        if kind == "eagle3":  # chain drafting feeds its own argmax back: compare the first step only
            fresh, logits = fresh[:1], logits[:1]
        torch.testing.assert_close(fresh, logits, atol=2e-4, rtol=2e-4)


def test_step_records_match_a_full_target_pass(tiny_target):
    prompt = prompt_of(13, seed=5)
    plain = generate(tiny_target, prompt, None, DecodeConfig(max_new_tokens=40))
    helped = PartlyRightDrafter(make_drafter(tiny_target, "dflash", 8), [plain], seed=2)
    spec = generate(tiny_target, prompt, helped, DecodeConfig(max_new_tokens=40, topk_logprobs=3))
    logp = torch.log_softmax(tiny_target.forward(torch.tensor(spec.tokens), 0, None).logits, -1)
    response_positions = torch.arange(spec.prompt_len, len(spec.tokens))
    expected = logp[response_positions - 1, torch.tensor(spec.response)]
    torch.testing.assert_close(torch.tensor(spec.committed_logprobs), expected, atol=1e-4, rtol=1e-4)
    for step in spec.steps:
        a, n = step.anchor, len(step.draft_tokens)
        assert step.draft_tokens[: step.accept_len] == spec.tokens[a + 1 : a + 1 + step.accept_len]
        if step.accept_len < n and a + 1 + step.accept_len < len(spec.tokens):
            assert step.draft_tokens[step.accept_len] != spec.tokens[a + 1 + step.accept_len]
        # proposal j is scored given the anchor and proposals before it, as the verify pass saw them
        block = torch.tensor(spec.tokens[: a + 1] + step.draft_tokens)
        block_logp = torch.log_softmax(tiny_target.forward(block, 0, None).logits, -1)
        rows = torch.arange(a, a + n)
        torch.testing.assert_close(
            torch.tensor(step.draft_logprobs), block_logp[rows, torch.tensor(step.draft_tokens)], atol=1e-4, rtol=1e-4
        )
        assert step.topk_ids[0] == logp[a].topk(3).indices.tolist()
    assert sum(s.accept_len + 1 for s in spec.steps) == spec.num_new_tokens - 1


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_stop_token_ends_both_decodes_at_the_same_place(tiny_target, kind):
    prompt = prompt_of(9, seed=7)
    free = generate(tiny_target, prompt, None, DecodeConfig(max_new_tokens=40))
    stop = free.response[17]
    cut = free.response.index(stop)
    cfg = DecodeConfig(max_new_tokens=40, stop_token_ids=[stop])
    plain = generate(tiny_target, prompt, None, cfg)
    helped = PartlyRightDrafter(make_drafter(tiny_target, kind, 16), [free], seed=4)
    spec = generate(tiny_target, prompt, helped, cfg)
    assert plain.response == free.response[: cut + 1]
    assert spec.tokens == plain.tokens and spec.stopped and plain.stopped


def test_prompt_longer_than_context_is_a_clear_error(tiny_target):
    limit = tiny_target.config.max_position_embeddings
    with pytest.raises(ValueError, match="exceeds the target's context"):
        generate(tiny_target, [1] * limit, None, DecodeConfig(max_new_tokens=8))


@pytest.mark.parametrize("block_size", [1, 8])
def test_kept_features_are_the_target_features_of_every_position(tiny_target, block_size):
    prompt = prompt_of(10, seed=8)
    drafter = make_drafter(tiny_target, "dflash", block_size) if block_size > 1 else None
    out = generate(tiny_target, prompt, drafter, DecodeConfig(max_new_tokens=30, keep_features=True))
    full = tiny_target.forward(torch.tensor(out.tokens), 0, None).features
    assert out.features.shape == full.shape
    torch.testing.assert_close(out.features, full, atol=1e-4, rtol=1e-4)
