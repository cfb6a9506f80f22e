"""Target-assisted rollout at T = 0 without decoding: the records of `generate`, rebuilt from the greedy text.

At T = 0 the committed text of a target-assisted rollout is the target's greedy text whatever the draft
proposes; only the draft's walk over it depends on the draft. So the records `generate` streams (anchors,
proposals, accept lengths, the target's log-probs of the committed tokens and of every proposal, its top-k,
the features) come from:

1. the greedy text, produced once per prompt by anyone (plain decoding, a corpus, a serving engine);
2. one target pass over it, for its features and logits;
3. batched drafter passes at candidate anchors and the walk over them (`text_tau.greedy_walk`); a chained
   drafter (EAGLE-3) then continues each walked chain past its first mismatch with its own proposals;
4. one target pass over the proposals that follow a block's first mismatch, each block attending to its
   text prefix through the text's KV cache and to its own earlier proposals (a 4D mask): the only target
   numbers whose inputs are not the text, and which only the rejected stream reads: an objective without
   one skips this pass (`DecodeConfig.off_text_logprobs`), and the records hold NaN there.

Sequential prefill and verify passes become two large target passes, which a CPU or GPU runs far faster per
token. The result differs from `generate`'s only by the float rounding of one prefill against incremental
verify passes (tests/test_parallel_rollout.py checks them field by field). At T > 0 the committed text depends
on the draft, so sampling rollouts stay sequential.
"""

from __future__ import annotations

import time

import torch

from draft_opd.speculative.decode import DecodeConfig, DecodeResult, StepRecord
from draft_opd.speculative.drafter import Drafter
from draft_opd.speculative.target import Target
from draft_opd.speculative.text_tau import TextWalk, committed_end, greedy_walk, text_labels


@torch.inference_mode()
def own_chain_proposals(drafter: Drafter, features: torch.Tensor, ids: torch.Tensor, walk: TextWalk) -> None:
    """Replace each walked block's proposals past its first mismatch by the ones a chained drafter feeds itself.

    `greedy_walk` drafts with the text as the chain, exact up to the first mismatch. Feeding the proposals back
    as the chain makes one more position exact per pass, batched over all walked anchors; a pass that changes
    nothing has reached the chain `propose` drafts."""
    width = drafter.cfg.block_size - 1
    if width < 2:  # a single proposal has no chain
        return
    anchors = torch.tensor(walk.anchors)
    widths = torch.tensor(walk.widths)
    chain = text_labels(ids, anchors, width)[0][:, : width - 1].clone()
    for i, (proposals, w) in enumerate(zip(walk.proposals, walk.widths)):
        chain[i, : min(w, width - 1)] = torch.tensor(proposals[: width - 1])
    drafted = torch.arange(width - 1)[None, :] < widths[:, None] - 1  # chain inputs the block's proposals read
    features = features.to(next(drafter.parameters()).dtype)
    for _ in range(width - 1):
        proposals = drafter(features, ids, anchors, chain, widths).argmax(-1)
        if torch.equal(proposals[:, : width - 1][drafted], chain[drafted]):
            break
        chain = proposals[:, : width - 1]
    walk.proposals = [p[:w] for p, w in zip(proposals.tolist(), walk.widths)]


def step_drafts(walk: TextWalk) -> list[list[int]]:
    """The proposals each step records: all drafted, or at a stop token only those before it (as `commit_block`)."""
    drafts = list(walk.proposals)
    if walk.stopped:
        drafts[-1] = drafts[-1][: walk.accept_lens[-1]]
    return drafts


@torch.no_grad()
def continuation_logits(
    target: Target, cache, text_len: int, anchors: list[int], firsts: list[int], blocks: list[list[int]]
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """The target's logits after block positions j > firsts[i] of blocks[i] drafted at anchors[i], in one pass
    on top of the text's cache (which they are appended to): input blocks[i][j-1] at position anchors[i] + j,
    attending to the text up to anchors[i] + firsts[i] (the block's prefix, all text) and to the block's own
    earlier inputs (a 4D mask). Returns the (i, j) keys and their logits [len(keys), V]."""
    ids, positions, sees, keys = [], [], [], []
    for i, (anchor, first, block) in enumerate(zip(anchors, firsts, blocks)):
        for j in range(first + 1, len(block)):
            ids.append(block[j - 1])
            positions.append(anchor + j)
            sees.append(anchor + first)
            keys.append((i, j))
    if not keys:
        return [], torch.empty(0, target.vocab_size)
    m = len(keys)
    first_of_block = torch.tensor([j == firsts[i] + 1 for i, j in keys])
    block_of = torch.cumsum(first_of_block.long(), 0)
    text_visible = torch.arange(text_len)[None, :] <= torch.tensor(sees)[:, None]
    own_visible = (block_of[:, None] == block_of[None, :]) & torch.tril(torch.ones(m, m, dtype=torch.bool))
    visible = torch.cat([text_visible, own_visible], dim=1)[None, None]
    out = target.forward_batch(
        torch.tensor([ids], device=target.device),
        torch.tensor([positions], device=target.device),
        cache,
        visible.to(target.device),
        with_features=False,
    )
    return keys, out.logits[0]


def off_text_logprobs(
    target: Target, cache, text_len: int, walk: TextWalk, drafts: list[list[int]]
) -> dict[tuple[int, int], torch.Tensor]:
    """{(step, j): the target's log-probs [V] after block position j} for the positions past a block's first
    mismatch: their inputs are proposals, not text."""
    keys, logits = continuation_logits(target, cache, text_len, walk.anchors, walk.accept_lens, drafts)
    return dict(zip(keys, torch.log_softmax(logits, dim=-1)))


def step_records(
    walk: TextWalk, drafts: list[list[int]], text_logp: torch.Tensor, off_text: dict, topk: int
) -> list[StepRecord]:
    """The StepRecords `generate` gives: a proposal's log-probs come from the text pass up to the block's first
    mismatch (its prefix is text) and from the off-text pass after it; NaN where `off_text` lacks them (not
    recorded, `DecodeConfig.off_text_logprobs`)."""
    unrecorded = torch.full_like(text_logp[0], float("nan"))
    records = []
    for step, (anchor, accepted, draft) in enumerate(zip(walk.anchors, walk.accept_lens, drafts)):
        rows = [
            text_logp[anchor + j] if j <= accepted else off_text.get((step, j), unrecorded) for j in range(len(draft))
        ]
        record = StepRecord(anchor=anchor, draft_tokens=draft, accept_len=accepted, draft_logprobs=[])
        if rows:
            logp = torch.stack(rows)
            record.draft_logprobs = logp[torch.arange(len(draft)), torch.tensor(draft)].tolist()
            if topk > 0:
                values, top = logp.topk(topk, dim=-1)
                record.topk_ids, record.topk_logprobs = top.tolist(), values.tolist()
        records.append(record)
    return records


@torch.inference_mode()
def rollout_on_text(
    target: Target, drafter: Drafter, text: list[int], prompt_len: int, cfg: DecodeConfig
) -> DecodeResult:
    """What `generate(target, text[:prompt_len], drafter, cfg)` returns at T = 0, given the target's greedy text
    `text` (prompt + response, from at least cfg.max_new_tokens new tokens or up to a stop token)."""
    if cfg.temperature > 0:
        raise ValueError(
            f"a parallel rollout needs temperature 0 (got {cfg.temperature}): at T > 0 the committed text depends "
            "on the draft; use rollout.mode=sequential"
        )
    if drafter.cfg.block_size < 2 or (cfg.block_size or drafter.cfg.block_size) != drafter.cfg.block_size:
        raise ValueError("a parallel rollout drafts at the drafter's own block size (>= 2)")
    stops = target.stop_token_ids() if cfg.stop_token_ids is None else cfg.stop_token_ids
    end = committed_end(text, prompt_len, cfg.max_new_tokens, stops)
    ids = torch.tensor(text[:end], dtype=torch.long, device=target.device)
    t0 = time.perf_counter()
    cache = target.new_cache()
    out = target.forward(ids, 0, cache, with_features=True)
    t1 = time.perf_counter()
    walk = greedy_walk(drafter, out.features, ids.tolist(), prompt_len, cfg.max_new_tokens, stops)
    if drafter.chained and walk.anchors:
        own_chain_proposals(drafter, out.features, ids, walk)
    drafts = step_drafts(walk)
    off_text = off_text_logprobs(target, cache, end, walk, drafts) if cfg.off_text_logprobs else {}
    text_logp = torch.log_softmax(out.logits, dim=-1)
    response = torch.arange(prompt_len, end)
    return DecodeResult(
        tokens=ids.tolist(),
        prompt_len=prompt_len,
        committed_logprobs=text_logp[response - 1, ids[response]].tolist(),
        steps=step_records(walk, drafts, text_logp, off_text, cfg.topk_logprobs),
        prefill_s=t1 - t0,
        decode_s=time.perf_counter() - t1,
        stopped=text[end - 1] in set(stops),
        features=out.features if cfg.keep_features else None,
    )
