"""Acceptance walked on the target's greedy text equals what speculative decoding records (tiny target)."""

import pytest

from draft_opd.speculative.decode import DecodeConfig, DecodeResult, generate
from draft_opd.speculative.tau import tau_mean
from draft_opd.speculative.text_tau import greedy_walk
from tests.conftest import fit_to_text, make_drafter

PROMPTS = [[5, 17, 99, 3], list(range(40, 71)), [250, 7]]


def references(target, max_new_tokens: int) -> list[DecodeResult]:
    cfg = DecodeConfig(max_new_tokens=max_new_tokens, keep_features=True, stop_token_ids=[])
    return [generate(target, prompt, None, cfg) for prompt in PROMPTS]


@pytest.fixture(scope="module", params=["dflash", "eagle3"])
def fitted(request, tiny_target):
    refs = references(tiny_target, 40)
    drafter = make_drafter(tiny_target, request.param, block_size=6)
    fit_to_text(drafter, refs)
    return drafter.eval(), refs


@pytest.mark.parametrize("max_new_tokens", [40, 29])
def test_accept_lens_on_the_text_are_those_decoding_records(tiny_target, fitted, max_new_tokens):
    drafter, refs = fitted
    spec_lens, text_lens = [], []
    for ref, prompt in zip(refs, PROMPTS):
        cfg = DecodeConfig(max_new_tokens=max_new_tokens, stop_token_ids=[])
        spec = generate(tiny_target, prompt, drafter, cfg)
        spec_lens.append([s.accept_len for s in spec.steps])
        text_lens.append(greedy_walk(drafter, ref.features, ref.tokens, ref.prompt_len, max_new_tokens, []).accept_lens)
    assert text_lens == spec_lens
    assert max(max(lens) for lens in spec_lens) >= 2  # the fitted draft is accepted in part: a real comparison
    assert tau_mean(text_lens) == tau_mean(spec_lens)


def test_a_stop_token_ends_the_walk_where_decoding_ends(tiny_target, fitted):
    drafter, refs = fitted
    ref, prompt = refs[1], PROMPTS[1]
    stop = ref.tokens[ref.prompt_len + 17]
    cfg = DecodeConfig(max_new_tokens=40, stop_token_ids=[stop])
    spec = generate(tiny_target, prompt, drafter, cfg)
    assert spec.stopped and spec.num_new_tokens < 40
    walked = greedy_walk(drafter, ref.features, ref.tokens, ref.prompt_len, 40, [stop]).accept_lens
    assert walked == [s.accept_len for s in spec.steps]


def test_a_reference_shorter_than_max_new_tokens_is_refused(tiny_target, fitted):
    drafter, refs = fitted
    ref = refs[0]
    with pytest.raises(ValueError, match="generate it with at least that many new tokens"):
        greedy_walk(drafter, ref.features, ref.tokens, ref.prompt_len, 64, [])
