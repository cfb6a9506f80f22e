"""Acceptance on the target's own greedy text, without decoding it again.

At T = 0 speculative decoding is lossless: it commits exactly the target's greedy text. So the accept length
of each verify step is the number of leading proposals, drafted at that step's anchor, that equal the text,
and the anchors follow from the accept lengths (next anchor = anchor + accepted + 1). Given the text and
its target features, the drafter's training pass (`Drafter.forward`, blocks at many anchors at once) gives
every block's proposals, and walking the anchors as `generate` does gives the accept lengths it records, with
no verify pass. Why: on a CPU a 50-prompt decode of a tau-2 draft takes ~15 min; this takes one prefill of the
reference text and drafter passes, so a study can score every checkpoint on hundreds of prompts. It differs
from decoding only by float noise in the features (one prefill against incremental verify passes), which
can flip a near-tied argmax; `draft-opd eval` stays the measure of record for speed and losslessness.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from draft_opd.speculative.drafter import Drafter


def text_labels(ids: torch.Tensor, anchors: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """labels[n, j] = ids[anchor+1+j] inside the sequence; mask marks which exist."""
    pos = anchors[:, None] + 1 + torch.arange(width)
    mask = pos < ids.shape[0]
    return ids[pos.clamp_max(ids.shape[0] - 1)], mask


def proposal_widths(anchors: torch.Tensor, prompt_len: int, max_new_tokens: int, block_size: int) -> torch.Tensor:
    """Proposals `draft_block` drafts at each anchor: a full block, or fewer where max_new_tokens cuts it."""
    committed = anchors - prompt_len + 1  # response tokens committed once the anchor is
    return (max_new_tokens - committed - 1).clamp(0, block_size - 1)


@torch.inference_mode()
def greedy_proposals(
    drafter: Drafter, features: torch.Tensor, tokens: torch.Tensor, anchors: torch.Tensor, widths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """([N] leading matches, [N, W] proposals): the greedy proposals at anchors[i], drafted with the text as the
    chain, and how many of the first widths[i] of them equal the text that follows. Up to and including the first
    mismatch they are what `propose` drafts at T = 0; past it a chained drafter (EAGLE-3) feeds its own."""
    width = drafter.cfg.block_size - 1
    labels, exists = text_labels(tokens, anchors, width)
    features = features.to(next(drafter.parameters()).dtype)
    proposals = drafter(features, tokens, anchors, labels[:, : width - 1], widths).argmax(-1)
    right = (proposals == labels) & exists & (torch.arange(width)[None, :] < widths[:, None])
    return right.long().cumprod(dim=1).sum(dim=1), proposals


def leading_matches(
    drafter: Drafter, features: torch.Tensor, tokens: torch.Tensor, anchors: torch.Tensor, widths: torch.Tensor
) -> torch.Tensor:
    """[N]: how many of the widths[i] greedy proposals at anchors[i] equal the text that follows it."""
    return greedy_proposals(drafter, features, tokens, anchors, widths)[0]


@dataclass
class TextWalk:
    """The verify steps `generate` takes at T = 0 over a greedy text: per step its anchor, its proposal count and
    accept length, and the greedy proposals drafted there with the text as the chain (`greedy_proposals`).
    `stopped`: the last step committed a stop token, so its record keeps only the proposals before it."""

    anchors: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    accept_lens: list[int] = field(default_factory=list)
    proposals: list[list[int]] = field(default_factory=list)
    stopped: bool = False


def committed_end(tokens: list[int], prompt_len: int, max_new_tokens: int, stop_ids: list[int]) -> int:
    """Where decoding the prompt of a greedy text `tokens` ends: after its first stop token or max_new_tokens."""
    end = min(len(tokens), prompt_len + max_new_tokens)
    if end <= prompt_len:
        raise ValueError("the reference text has no response token: it cannot show where decoding goes")
    stops = set(stop_ids)
    stop = next((i for i in range(prompt_len, end) if tokens[i] in stops), None)
    if stop is not None:
        return stop + 1
    if end < prompt_len + max_new_tokens:
        raise ValueError(
            f"the reference text has {end - prompt_len} response tokens and no stop token, fewer than "
            f"max_new_tokens={max_new_tokens}: generate it with at least that many new tokens"
        )
    return end


def greedy_walk(
    drafter: Drafter,
    features: torch.Tensor,
    tokens: list[int],
    prompt_len: int,
    max_new_tokens: int,
    stop_ids: list[int],
    chunk: int = 32,
) -> TextWalk:
    """The steps `generate(target, prompt, drafter)` takes at T = 0, from the target's greedy text `tokens`
    (prompt + response, generated with at least this max_new_tokens) and its features [len, F].
    Blocks are drafted `chunk` anchors at a time, from the next anchor the walk reaches."""
    end = committed_end(tokens, prompt_len, max_new_tokens, stop_ids)
    ids = torch.tensor(tokens, dtype=torch.long)
    stops = set(stop_ids)
    walk, anchor, drafted = TextWalk(), prompt_len, {}
    while anchor < end - 1:
        if anchor not in drafted:
            anchors = torch.arange(anchor, min(anchor + chunk, end - 1))
            widths = proposal_widths(anchors, prompt_len, max_new_tokens, drafter.cfg.block_size)
            matches, proposals = greedy_proposals(drafter, features, ids, anchors, widths)
            drafted = {
                a: (m, w, p[:w])
                for a, m, w, p in zip(anchors.tolist(), matches.tolist(), widths.tolist(), proposals.tolist())
            }
        accepted, width, proposals = drafted[anchor]
        stop = next((k for k in range(accepted + 1) if tokens[anchor + 1 + k] in stops), None)
        walk.anchors.append(anchor)
        walk.widths.append(width)
        walk.proposals.append(proposals)
        if stop is not None:  # committed up to a stop token: decoding ends there
            walk.accept_lens.append(min(accepted, stop))
            walk.stopped = True
            break
        walk.accept_lens.append(accepted)
        anchor += accepted + 1
    return walk
