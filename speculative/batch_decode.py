"""Batched target-assisted rollouts: B sequences share each verify pass, with ragged accept lengths.

Rollouts need throughput, not latency, and the target's verify forward is their cost. Each row keeps
its own drafter state and sampler and goes through the same steps as `generate` (`start_row`,
`draft_block`, `commit_block`, `finish_row`); the verify forward runs over all rows at once, and so do
the drafter's proposals where the drafter can share work across rows (`draft_blocks`).

The rows share one KV cache in which slot s of a row holds its position s. A step appends a padded
block after the longest row; an explicit mask lets each row see its own prefix and, causally, its own
block. After verification each row's committed slots move down to follow its prefix and the cache is
cropped to the longest row, so it never grows by more than what was committed. A finished row leaves
and the next request takes its place, prefilled alone as `generate` prefills.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from draft_opd.speculative.decode import (
    DecodeConfig,
    DecodeResult,
    Row,
    block_size_of,
    commit_block,
    draft_blocks,
    finish_row,
    start_row,
)
from draft_opd.speculative.drafter import Drafter
from draft_opd.speculative.target import Target, crop_cache


@dataclass
class _Live:
    index: int  # position of the request in the stream
    row: Row
    started: float  # end of its prefill


def block_mask(lengths: torch.Tensor, cached: int, width: int) -> torch.Tensor:
    """[B, 1, width, cached + width], True = visible: row r sees its first lengths[r] slots and its block causally."""
    slots = torch.arange(cached + width, device=lengths.device)
    prefix = slots[None, None, :] < lengths[:, None, None]
    offset = slots - cached
    block = (offset[None, :] >= 0) & (offset[None, :] <= torch.arange(width, device=lengths.device)[:, None])
    return (prefix | block[None]).unsqueeze(1)


def _pad_slots(x: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, length - x.shape[2]))


def append_row(cache: DynamicCache | None, row_cache: DynamicCache) -> DynamicCache:
    """The shared cache with a prefilled one-row cache added as its last row (the shorter side is padded)."""
    if cache is None:
        return row_cache
    for layer, new in zip(cache.layers, row_cache.layers):
        length = max(layer.keys.shape[2], new.keys.shape[2])
        layer.keys = torch.cat([_pad_slots(layer.keys, length), _pad_slots(new.keys, length)])
        layer.values = torch.cat([_pad_slots(layer.values, length), _pad_slots(new.values, length)])
    return cache


def keep_committed(cache: DynamicCache, lengths: torch.Tensor, cached: int, counts: torch.Tensor) -> None:
    """Move row r's committed block slots cached .. cached + counts[r] - 1 to lengths[r] ..., then crop the
    cache to the longest row: rejected proposals and padding are gone."""
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    offsets = torch.arange(rows.numel(), device=counts.device) - (counts.cumsum(0) - counts)[rows]
    src, dst = cached + offsets, lengths[rows] + offsets
    for layer in cache.layers:
        for x in (layer.keys, layer.values):
            x[rows, :, dst] = x[rows, :, src]
    crop_cache(cache, int((lengths + counts).max()))


def keep_rows(cache: DynamicCache, keep: list[int], lengths: list[int]) -> DynamicCache | None:
    """The shared cache restricted to rows `keep` (of lengths `lengths`), cropped to the longest; None if empty."""
    if not keep:
        return None
    cache.batch_select_indices(torch.tensor(keep))
    crop_cache(cache, max(lengths))
    return cache


@torch.inference_mode()
def generate_batch(
    target: Target,
    requests: Iterable[tuple[Sequence[int], int]],
    drafter: Drafter | None,
    cfg: DecodeConfig,
    batch_size: int,
) -> Iterator[tuple[int, DecodeResult]]:
    """Decode each (prompt, seed) of `requests`, up to `batch_size` at once; yield (request index, result)
    as rows finish. Requests are read lazily, one whenever a row is free.

    A result holds the records `generate(target, prompt, drafter, replace(cfg, seed=seed))` gives: every
    row has its own generator, used in the same order. Only the batched verify forward differs, by the
    rounding of batched GEMMs and masked attention (tests/test_batch_decode.py measures it).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    with_features = block_size_of(drafter, cfg) > 1 or cfg.keep_features
    stream = enumerate(requests)
    live: list[_Live] = []
    cache: DynamicCache | None = None

    def complete(row: Row) -> bool:  # keep_features: a finished row still verifies its last token, for its features
        return row.done(cfg) and (not cfg.keep_features or row.result.features is not None)

    while True:
        if any(complete(item.row) for item in live):
            now = time.perf_counter()
            for item in live:
                if complete(item.row):
                    item.row.result.decode_s = now - item.started
                    yield item.index, item.row.result
            keep = [i for i, item in enumerate(live) if not complete(item.row)]
            cache = keep_rows(cache, keep, [live[i].row.anchor_pos for i in keep])
            live = [live[i] for i in keep]
        for index, (prompt, seed) in itertools.islice(stream, batch_size - len(live)):
            row_cache = target.new_cache()
            row = start_row(target, prompt, drafter, cfg, row_cache, seed)
            cache = append_row(cache, row_cache)
            live.append(_Live(index, row, time.perf_counter()))
        if not live:
            return
        if any(complete(item.row) for item in live):
            continue
        finishing = [item.row.done(cfg) for item in live]
        drafting = [item.row for item, end in zip(live, finishing) if not end]
        drafted = iter(draft_blocks(drafting, drafter, cfg))
        blocks = [(item.row.anchor.new_empty(0), None) if end else next(drafted) for item, end in zip(live, finishing)]
        width = 1 + max(draft.shape[0] for draft, _ in blocks)
        ids = torch.zeros(len(live), width, dtype=torch.long, device=target.device)
        for r, (item, (draft, _)) in enumerate(zip(live, blocks)):
            ids[r, : 1 + draft.shape[0]] = torch.cat([item.row.anchor.view(1), draft])
        lengths = torch.tensor([item.row.anchor_pos for item in live], device=target.device)
        cached = cache.get_seq_length()
        positions = lengths[:, None] + torch.arange(width, device=target.device)
        out = target.forward_batch(ids, positions, cache, block_mask(lengths, cached, width), with_features)
        counts = torch.zeros_like(lengths)
        for r, (item, (draft, draft_logits), end) in enumerate(zip(live, blocks, finishing)):
            if end:
                finish_row(item.row, out.features[r, :1])
            else:
                w = 1 + draft.shape[0]
                counts[r] = commit_block(
                    item.row, draft, draft_logits, out.logits[r, :w], out.features[r, :w], drafter, cfg
                )
        keep_committed(cache, lengths, cached, counts)
