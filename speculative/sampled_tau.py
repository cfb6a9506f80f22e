"""Expected acceptance at T > 0, scored on text the target sampled, without decoding.

At T > 0 speculative sampling accepts proposal x_j with probability r_j = min(1, p_j(x_j) / q_j(x_j)) and stops at
the first rejection, so for one drafted block the accept count A has P(A >= k) = r_0 ... r_{k-1} exactly. This
scores a draft on a target-sampled text: at every anchor of the text one block is sampled from q (Gumbel-max, so a
chained drafter's block is the fixed point of its training pass, as `parallel_rollout.own_chain_proposals`), p
comes from one target pass over the text and one over the proposals (`parallel_rollout.continuation_logits`), and
the expected number of verify steps to commit the text follows over the coin flips by dynamic programming on the
anchors. Why: decoding 50 prompts at T = 1 takes a quarter hour per draft on 2 cores, too slow to score every
checkpoint of a study; this costs two batched target passes and drafter passes per text, which a study can cache.
What it approximates: decoding commits draft and residual samples, not this text. Each anchor's prefix is
p-distributed either way (sampling is lossless), but the walk's anchors are the text's, so `draft-opd eval` at
eval.temperature > 0 stays the measure of record (tests/test_sampled_tau.py checks the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from draft_opd.speculative.drafter import Drafter
from draft_opd.speculative.parallel_rollout import continuation_logits
from draft_opd.speculative.target import Target
from draft_opd.speculative.text_tau import committed_end, proposal_widths, text_labels


@torch.inference_mode()
def sampled_blocks(
    drafter: Drafter,
    features: torch.Tensor,
    ids: torch.Tensor,
    anchors: torch.Tensor,
    widths: torch.Tensor,
    temperature: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, W] proposals sampled from q at temperature T at each anchor, [N, W] their log q). Gumbel-max draws a
    sample from fixed noise, so a chained drafter fed its own samples reaches the block `propose` samples: each
    pass makes one more position exact."""
    width = drafter.cfg.block_size - 1
    noise = torch.rand(len(anchors), width, drafter.cfg.vocab_size, generator=generator).clamp_(1e-20, 1.0)
    gumbel = -torch.log(-torch.log(noise))
    chain = text_labels(ids, anchors, width)[0][:, : width - 1]
    features = features.to(next(drafter.parameters()).dtype)
    for _ in range(width if drafter.chained else 1):
        scaled = drafter(features, ids, anchors, chain, widths).float() / temperature
        samples = (scaled + gumbel).argmax(-1)
        if torch.equal(samples[:, : width - 1], chain):
            break
        chain = samples[:, : width - 1]
    logq = torch.log_softmax(scaled, dim=-1).gather(-1, samples[..., None])[..., 0]
    return samples, logq


def expected_steps(accept_probs: torch.Tensor, anchors: list[int], widths: list[int], end: int) -> float:
    """Expected verify steps to commit the text up to `end`, walking from anchors[0]: from anchor a, A = k
    accepts with probability P(A >= k) - P(A >= k+1), P(A >= k) the product of the first k accept_probs of a's
    block, and the next anchor is a + k + 1."""
    steps = torch.zeros(end + 1, dtype=torch.float64)
    index = {a: i for i, a in enumerate(anchors)}
    for a in range(end - 2, anchors[0] - 1, -1):
        i, w = index[a], widths[index[a]]
        at_least = torch.cat([torch.ones(1, dtype=torch.float64), accept_probs[i, :w].double().cumprod(0)])
        exactly = at_least - torch.cat([at_least[1:], torch.zeros(1, dtype=torch.float64)])
        nexts = torch.clamp(a + torch.arange(w + 1) + 1, max=end - 1)
        steps[a] = 1 + (exactly * steps[nexts]).sum()
    return float(steps[anchors[0]])


@dataclass
class SampledBlocks:
    """One block sampled from q at every anchor of a text, with each proposal's accept probability min(1, p/q)."""

    anchors: list[int]
    widths: list[int]
    proposals: torch.Tensor  # [N, W]; row i's first widths[i] are drafted
    accept_probs: torch.Tensor  # [N, W]
    prompt_len: int
    end: int  # the text's committed length (`committed_end`)

    def steps(self) -> tuple[int, float]:
        """(tokens the verify steps commit, their expected number) when the draft decodes over this text;
        tau_pooled over texts is the sum of the first over the sum of the second. The first response token
        comes from the prefill, as in `generate`."""
        if not self.anchors:
            return 0, 0.0
        return self.end - self.prompt_len - 1, expected_steps(self.accept_probs, self.anchors, self.widths, self.end)


@torch.inference_mode()
def sample_blocks_on_text(
    target: Target,
    drafter: Drafter,
    text: list[int],
    prompt_len: int,
    max_new_tokens: int,
    temperature: float,
    stop_ids: list[int],
    generator: torch.Generator,
    chunk: int = 32,
) -> SampledBlocks:
    """A block from q at every anchor `generate` could verify at over the target-sampled text `text` (prompt +
    response), scored by the target: the first proposal's p from the text's own pass, the others' from one pass
    over the proposals, each block attending to its text prefix and its own earlier proposals."""
    if temperature <= 0:
        raise ValueError("the sampled-text scorer is for T > 0; at T = 0 use text_tau.greedy_walk")
    end = committed_end(text, prompt_len, max_new_tokens, stop_ids)
    ids = torch.tensor(text[:end], dtype=torch.long, device=target.device)
    cache = target.new_cache()
    out = target.forward(ids, 0, cache, with_features=True)
    anchors = torch.arange(prompt_len, end - 1)
    widths = proposal_widths(anchors, prompt_len, max_new_tokens, drafter.cfg.block_size)
    parts = [
        sampled_blocks(drafter, out.features, ids, a, w, temperature, generator)
        for a, w in zip(anchors.split(chunk), widths.split(chunk))
    ]
    samples, logq = torch.cat([s for s, _ in parts]), torch.cat([q for _, q in parts])
    logp = torch.log_softmax(out.logits[anchors] / temperature, dim=-1).gather(-1, samples[:, :1])
    logp = torch.cat([logp, torch.zeros_like(logq[:, 1:])], dim=1)
    blocks = [s[:w] for s, w in zip(samples.tolist(), widths.tolist())]
    keys, logits = continuation_logits(target, cache, end, anchors.tolist(), [0] * len(blocks), blocks)
    if keys:
        rows, cols = torch.tensor(keys).T
        logp[rows, cols] = torch.log_softmax(logits / temperature, dim=-1).gather(-1, samples[rows, cols, None])[:, 0]
    accept = torch.exp(torch.clamp(logp - logq, max=0.0))
    return SampledBlocks(anchors.tolist(), widths.tolist(), samples, accept, prompt_len, end)
