"""The T > 0 scorer on target-sampled text (`speculative.sampled_tau`): its accept probabilities equal the
ones verification computes from plain passes, its walk's expectation matches hand-computed values, and its tau
agrees with decoding at T = 1 within decoding's 95 % interval over prompts and seeds (slow)."""

import statistics

import pytest
import torch

from draft_opd.speculative.decode import DecodeConfig, generate
from draft_opd.speculative.sampled_tau import expected_steps, sample_blocks_on_text
from tests.conftest import make_drafter

PROMPTS = [[5 + i, 17 * i % 250, 99, 3 + i] for i in range(12)]
NEW_TOKENS = 40


def sampled_text(target, prompt, seed, temperature=1.0):
    cfg = DecodeConfig(max_new_tokens=NEW_TOKENS, temperature=temperature, seed=seed, stop_token_ids=[])
    return generate(target, prompt, None, cfg).tokens


def test_expected_steps_of_a_hand_computed_walk():
    # end 4: anchors 0, 1, 2 with 2, 1, 0 proposals. From 2: one step. From 1: A=0 (0.7) -> 2, A=1 (0.3) -> done:
    # 1 + 0.7 = 1.7. From 0: A=0 (0.5) -> 1, A=1 (0.3) -> 2, A=2 (0.2) -> done: 1 + 0.5 * 1.7 + 0.3 * 1 = 2.15
    accept = torch.tensor([[0.5, 0.4], [0.3, 0.0], [0.0, 0.0]])
    assert expected_steps(accept, [0, 1, 2], [2, 1, 0], 4) == pytest.approx(2.15)
    assert expected_steps(torch.ones(3, 2), [0, 1, 2], [2, 1, 0], 4) == pytest.approx(1.0)  # all accepted
    assert expected_steps(torch.zeros(3, 2), [0, 1, 2], [2, 1, 0], 4) == pytest.approx(3.0)  # one token a step


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_accept_probabilities_equal_plain_target_and_drafter_passes(tiny_target, kind):
    """Each block's min(1, p/q): p from a fresh target pass over text prefix + the block (what verify reads), q
    from the drafter fed the block itself as its chain (what `propose` samples from)."""
    drafter = make_drafter(tiny_target, kind, block_size=5).eval()
    temperature = 0.8
    text = sampled_text(tiny_target, PROMPTS[0], seed=3, temperature=temperature)
    prompt_len = len(PROMPTS[0])
    blocks = sample_blocks_on_text(
        tiny_target, drafter, text, prompt_len, 20, temperature, [], torch.Generator().manual_seed(0)
    )
    assert blocks.anchors == list(range(prompt_len, prompt_len + 19)) and blocks.widths[-1] == 0
    features = generate(tiny_target, text, None, DecodeConfig(max_new_tokens=1, keep_features=True)).features
    ids = torch.tensor(text)
    for i in (0, 7, len(blocks.anchors) - 3):
        anchor, w = blocks.anchors[i], blocks.widths[i]
        block = blocks.proposals[i, :w]
        verify = tiny_target.forward(torch.cat([ids[: anchor + 1], block]), 0, None, with_features=False).logits
        p = torch.softmax(verify[anchor : anchor + w] / temperature, -1)[torch.arange(w), block]
        chain = blocks.proposals[i : i + 1, : drafter.cfg.block_size - 2]
        with torch.no_grad():
            q_logits = drafter(features[: len(text)], ids, torch.tensor([anchor]), chain, torch.tensor([w]))[0, :w]
        q = torch.softmax(q_logits / temperature, -1)[torch.arange(w), block]
        torch.testing.assert_close(blocks.accept_probs[i, :w], (p / q).clamp(max=1.0), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_sampled_text_tau_agrees_with_decoding_at_t1(tiny_target, kind):
    """12 prompts x 10 sampling seeds: the scorer's pooled tau lies inside decoding's 95 % interval."""
    drafter = make_drafter(tiny_target, kind, block_size=6).eval()
    decoded, scored = [], []
    for i, prompt in enumerate(PROMPTS):
        for seed in range(10):
            cfg = DecodeConfig(max_new_tokens=NEW_TOKENS, temperature=1.0, seed=seed, stop_token_ids=[])
            result = generate(tiny_target, prompt, drafter, cfg)
            decoded.append((result.num_new_tokens - 1) / len(result.steps))
            text = sampled_text(tiny_target, prompt, seed=1000 + 10 * i + seed)
            gen = torch.Generator().manual_seed(seed)
            blocks = sample_blocks_on_text(tiny_target, drafter, text, len(prompt), NEW_TOKENS, 1.0, [], gen)
            scored.append(blocks.steps())
    mean = statistics.mean(decoded)
    half = 1.96 * statistics.stdev(decoded) / len(decoded) ** 0.5
    estimate = sum(t for t, _ in scored) / sum(s for _, s in scored)
    assert mean > 1.2  # blocks are accepted in part: the test can tell a wrong scorer
    assert abs(estimate - mean) <= half, (estimate, mean, half)


def test_text_scorer_at_t1_scores_sampled_references_at_each_seed(tmp_path):
    from draft_opd.launch.config import load_config
    from draft_opd.studies.text_eval import TextScorer

    def load(*keys):
        return load_config("configs/tiny.yaml", ["eval.temperature=1.0", "eval.seeds=2", *keys])

    scorer = TextScorer(load, tmp_path, prompts=1, max_new_tokens=12)
    drafter = scorer.drafter()  # a random one of the config's kind
    score = scorer(drafter, ("gsm8k",))["gsm8k"]
    refs = scorer.refs["gsm8k"]
    assert [r.seed for r in refs] == [0, 1] and refs[0].tokens != refs[1].tokens  # one text per seed
    assert (tmp_path / "reference-gsm8k-1x12-T1x2.pt").exists()
    stops = scorer.target.stop_token_ids()
    steps = [
        sample_blocks_on_text(
            scorer.target, drafter, r.tokens, r.prompt_len, 12, 1.0, stops, torch.Generator().manual_seed(r.seed)
        ).steps()
        for r in refs
    ]
    assert score["prompts"] == 2 and score["tau_ci95"] > 0
    assert score["tau_mean"] == pytest.approx(statistics.fmean(t / s for t, s in steps))
