"""Batched rollouts: every row decodes as `generate` decodes it alone, whatever shares its verify passes.

Batched verification is not bit-identical to batch 1 in fp32 on CPU: GEMMs over more rows and the
explicit attention mask round differently (measured on the tiny target: log-probs within 1e-5,
features within 4e-5). Tokens, anchors, proposals and accept lengths must match exactly; log-probs
and features match within the 1e-4 that tests/test_decode.py allows a differently shaped target pass.
"""

from dataclasses import replace

import pytest
import torch

from draft_opd.speculative.batch_decode import append_row, block_mask, generate_batch, keep_committed
from draft_opd.speculative.decode import DecodeConfig, DecodeResult, generate
from draft_opd.speculative.target import Target
from draft_opd.speculative.testbeds import tiny_model
from tests.conftest import make_drafter
from tests.test_decode import PartlyRightDrafter, prompt_of
from tests.test_sampling import exact_two_token_distribution, fit_pvalue

LENGTHS = [1, 9, 57, 4, 23, 2, 14]  # more prompts than rows: finished rows are refilled


def close(a, b) -> None:
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), atol=1e-4, rtol=1e-4)


def assert_same_records(batched: DecodeResult, alone: DecodeResult) -> None:
    assert batched.tokens == alone.tokens and batched.prompt_len == alone.prompt_len
    assert batched.stopped == alone.stopped
    assert [(s.anchor, s.draft_tokens, s.accept_len, s.topk_ids) for s in batched.steps] == [
        (s.anchor, s.draft_tokens, s.accept_len, s.topk_ids) for s in alone.steps
    ]
    close(batched.committed_logprobs, alone.committed_logprobs)
    for b, a in zip(batched.steps, alone.steps):
        close(b.draft_logprobs, a.draft_logprobs)
        if a.topk_logprobs:
            close(b.topk_logprobs, a.topk_logprobs)
    if alone.features is not None:
        close(batched.features, alone.features)


def decode_both(target, prompts, drafter, cfg, batch_size, seeds=None):
    """Each prompt decoded alone by `generate` and all of them by `generate_batch` (results in prompt order)."""
    seeds = seeds or [0] * len(prompts)
    alone = [generate(target, p, drafter, replace(cfg, seed=s)) for p, s in zip(prompts, seeds)]
    batched = dict(generate_batch(target, zip(prompts, seeds), drafter, cfg, batch_size))
    return alone, [batched[i] for i in range(len(prompts))]


@pytest.mark.parametrize("kind", ["dflash", "eagle3", None])
def test_rows_equal_plain_greedy_with_ragged_accept_lengths(tiny_target, kind):
    prompts = [prompt_of(n, seed=n) for n in LENGTHS]
    cfg = DecodeConfig(max_new_tokens=32, topk_logprobs=2 if kind else 0)
    plain = [generate(tiny_target, p, None, cfg) for p in prompts]
    drafter = PartlyRightDrafter(make_drafter(tiny_target, kind, 6), plain, seed=1) if kind else None
    alone, batched = decode_both(tiny_target, prompts, drafter, cfg, batch_size=3)
    for row, spec, reference in zip(batched, alone, plain):
        assert row.tokens == reference.tokens
        assert_same_records(row, spec)
    if kind:  # rows verified together accepted different numbers of proposals
        assert {s.accept_len for row in batched for s in row.steps} == set(range(6))


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_rows_that_stop_early_are_refilled_and_keep_their_features(tiny_target, kind):
    prompts = [prompt_of(n, seed=n) for n in LENGTHS[:5]]
    free = [generate(tiny_target, p, None, DecodeConfig(max_new_tokens=40)) for p in prompts]
    stop = free[0].response[6]  # ends some rows early, not all
    cfg = DecodeConfig(max_new_tokens=40, stop_token_ids=[stop], keep_features=True)
    drafter = PartlyRightDrafter(make_drafter(tiny_target, kind, 8), free, seed=2)
    alone, batched = decode_both(tiny_target, prompts, drafter, cfg, batch_size=2)
    assert any(r.stopped for r in batched) and not all(r.stopped for r in batched)
    for row, spec in zip(batched, alone):
        assert_same_records(row, spec)
        assert row.features.shape[0] == len(row.tokens)


@pytest.mark.parametrize("keep_features", [False, True])
def test_rows_done_after_prefill(tiny_target, keep_features):
    prompts = [prompt_of(n, seed=n) for n in LENGTHS[:3]]
    cfg = DecodeConfig(max_new_tokens=1, keep_features=keep_features)
    alone, batched = decode_both(tiny_target, prompts, make_drafter(tiny_target, "dflash", 4), cfg, batch_size=2)
    for row, spec in zip(batched, alone):
        assert_same_records(row, spec)


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_sampled_rows_equal_their_alone_decode_with_the_same_seed(tiny_target, kind):
    """Each row samples from its own generator in generate's order, so T > 0 rollouts repeat batch 1's."""
    prompts = [prompt_of(n, seed=n) for n in LENGTHS]
    cfg = DecodeConfig(max_new_tokens=24, temperature=0.8)
    alone, batched = decode_both(
        tiny_target,
        prompts,
        make_drafter(tiny_target, kind, 5),
        cfg,
        batch_size=4,
        seeds=list(range(10, 10 + len(prompts))),
    )
    for row, spec in zip(batched, alone):
        assert_same_records(row, spec)
    assert len({tuple(r.response) for r in batched}) == len(prompts)


def test_batched_sampling_follows_the_target_distribution():
    """As tests/test_sampling.py checks `generate`: the first two sampled tokens follow the target's joint law."""
    target = Target(tiny_model(seed=1, vocab_size=6, pad_token_id=None, eos_token_id=None), None, [0, 1, 2])
    drafter = make_drafter(target, "dflash", block_size=3, seed=1, mask_token_id=5)
    prompt, runs = [1, 4, 2], 2000
    expected = exact_two_token_distribution(target, prompt, 1.0)
    cfg = DecodeConfig(max_new_tokens=2, temperature=1.0, stop_token_ids=[])
    counts = torch.zeros(36)
    for _, out in generate_batch(target, ((prompt, seed) for seed in range(runs)), drafter, cfg, batch_size=16):
        counts[out.response[0] * 6 + out.response[1]] += 1
    keep = expected * runs >= 5
    observed = torch.cat([counts[keep], counts[~keep].sum().view(1)])
    probs = torch.cat([expected[keep], expected[~keep].sum().view(1)])
    assert fit_pvalue(observed, probs) > 1e-3


def test_shared_cache_keeps_each_rows_committed_tokens_and_nothing_more(tiny_target):
    prompts, blocks, counts = [prompt_of(3, 1), prompt_of(7, 2)], [prompt_of(4, 3), prompt_of(4, 4)], [4, 1]
    cache = None
    for prompt in prompts:
        row_cache = tiny_target.new_cache()
        tiny_target.forward(torch.tensor(prompt), 0, row_cache)
        cache = append_row(cache, row_cache)
    lengths = torch.tensor([3, 7])
    positions = lengths[:, None] + torch.arange(4)
    tiny_target.forward_batch(torch.tensor(blocks), positions, cache, block_mask(lengths, 7, 4))
    keep_committed(cache, lengths, 7, torch.tensor(counts))
    assert cache.get_seq_length() == 8  # the longer row: 7 + 1 (not 7 + a block of 4)
    for r, (prompt, block, count) in enumerate(zip(prompts, blocks, counts)):
        alone = tiny_target.new_cache()
        tiny_target.forward(torch.tensor(prompt + block[:count]), 0, alone)
        n = len(prompt) + count
        for shared, own in zip(cache.layers, alone.layers):
            close(shared.keys[r, :, :n], own.keys[0])
            close(shared.values[r, :, :n], own.values[0])
