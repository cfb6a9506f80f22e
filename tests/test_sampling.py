"""At T > 0 speculative sampling must reproduce the target's distribution exactly.

Each check is a chi-square goodness-of-fit test; the same statistic applied to a deliberately wrong
acceptance rule must reject it, which shows the test has the power to catch a broken rule.
"""

import pytest
import torch
from scipy.stats import chisquare

from draft_opd.speculative.decode import DecodeConfig, generate
from draft_opd.speculative.target import Target
from draft_opd.speculative.testbeds import tiny_model
from draft_opd.speculative.verify import verify_sampling
from tests.conftest import make_drafter

P = torch.tensor([[0.05, 0.40, 0.10, 0.30, 0.15], [0.20, 0.20, 0.20, 0.20, 0.20]])
Q = torch.tensor([[0.30, 0.10, 0.40, 0.10, 0.10]])
N = 20_000


def verify_resample_from_p(draft, q, p, generator):
    """Wrong on purpose: after a rejection, resample from p instead of the residual max(0, p - q)."""
    accept = torch.rand(1, generator=generator) * q[0, draft[0]] < p[0, draft[0]]
    if accept:
        return 1, torch.multinomial(p[1], 1, generator=generator)[0]
    return 0, torch.multinomial(p[0], 1, generator=generator)[0]


def verify_accept_always(draft, q, p, generator):
    """Wrong on purpose: accept every proposal."""
    return 1, torch.multinomial(p[1], 1, generator=generator)[0]


def first_token_counts(rule) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    for _ in range(N):
        draft = torch.multinomial(Q[0], 1, generator=gen)
        accepted, bonus = rule(draft, Q, P, gen)
        counts[int(draft[0] if accepted else bonus)] += 1
    return counts


def fit_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return float(chisquare(counts.numpy(), (probs * counts.sum()).numpy()).pvalue)


def test_rejection_sampling_reproduces_the_target_distribution():
    assert fit_pvalue(first_token_counts(verify_sampling), P[0]) > 1e-3


@pytest.mark.parametrize("wrong_rule", [verify_resample_from_p, verify_accept_always])
def test_the_same_check_rejects_a_wrong_acceptance_rule(wrong_rule):
    assert fit_pvalue(first_token_counts(wrong_rule), P[0]) < 1e-6


def exact_two_token_distribution(target: Target, prompt: list[int], temperature: float) -> torch.Tensor:
    ids = torch.tensor(prompt)
    p1 = torch.softmax(target.forward(ids, 0, None).logits[-1] / temperature, -1)
    vocab = p1.numel()
    joint = torch.zeros(vocab, vocab)
    for x in range(vocab):
        logits = target.forward(torch.cat([ids, torch.tensor([x])]), 0, None).logits[-1]
        joint[x] = p1[x] * torch.softmax(logits / temperature, -1)
    return joint.flatten()


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_speculative_decode_loop_samples_the_target_distribution(kind):
    """End to end on a 6-token vocabulary: the first two sampled tokens follow the target's joint law."""
    target = Target(tiny_model(seed=1, vocab_size=6, pad_token_id=None, eos_token_id=None), None, [0, 1, 2])
    drafter = make_drafter(target, kind, block_size=3, seed=1, mask_token_id=5)
    prompt, temperature, runs = [1, 4, 2], 1.0, 3000
    expected = exact_two_token_distribution(target, prompt, temperature)
    counts = torch.zeros(36)
    for seed in range(runs):
        out = generate(
            target,
            prompt,
            drafter,
            DecodeConfig(max_new_tokens=2, temperature=temperature, seed=seed, stop_token_ids=[]),
        )
        counts[out.response[0] * 6 + out.response[1]] += 1
    keep = expected * runs >= 5  # chi-square needs expected counts of at least ~5
    observed = torch.cat([counts[keep], counts[~keep].sum().view(1)])
    probs = torch.cat([expected[keep], expected[~keep].sum().view(1)])
    assert fit_pvalue(observed, probs) > 1e-3
