"""Sampling (trajectory, anchor) blocks with their accepted and rejected positions.

An item is one verify step of one stored trajectory. Column j of an item's block is block
offset j+1, the absolute position anchor+1+j of input_ids, where proposal draft_tokens[j] was
made. For j < accept_len the proposal was accepted (it is the committed token there); at
j = accept_len the target's bonus token was committed instead, so proposals j >= accept_len
are rejected (only the first was verified on-policy, all are recorded).

Policies weigh each step by an integer so the draw is exact:
- `uniform`: every anchor of every eligible trajectory weighs 1;
- `rejection`: a step weighs 1 + its number of rejected proposals, so blocks that carry more
  of the rejected stream come up more often while fully accepted blocks still appear.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from draft_opd.buffer.store import TrajectoryStore

POLICIES = ("uniform", "rejection")


def step_weight(policy: str):
    """The per-step weight function of a policy, applied once when a row is stored."""
    if policy == "uniform":
        return lambda accept, n_draft: np.ones(len(accept), dtype=np.int64)
    if policy == "rejection":
        return lambda accept, n_draft: 1 + (n_draft - accept).astype(np.int64)
    raise ValueError(f"sample_policy={policy!r} is unknown; use one of {POLICIES}")


@dataclass(frozen=True)
class SampledItem:
    """One block, spelled out; `SampleBatch.item(i)`. Positions are absolute indices into input_ids."""

    traj_id: str
    draft_version: int
    input_ids: np.ndarray
    prompt_len: int
    features: np.ndarray | None
    step: int
    anchor: int
    accept_len: int
    draft_tokens: np.ndarray  # all B-1 proposals of the block
    draft_logprobs: np.ndarray  # the target's log-prob of each proposal
    accepted_positions: np.ndarray
    accepted_tokens: np.ndarray
    accepted_logprobs: np.ndarray  # the target's log-prob of the accepted (committed) tokens
    rejected_positions: np.ndarray
    rejected_tokens: np.ndarray
    rejected_logprobs: np.ndarray  # the target's log-prob of the rejected proposals
    bonus_position: int | None  # the target's own token inside the block; None if all were accepted
    bonus_token: int | None
    bonus_logprob: float | None
    topk_ids: np.ndarray | None  # [B-1, k] the target's top-k at each proposal's position
    topk_logprobs: np.ndarray | None


@dataclass(frozen=True)
class SampleBatch:
    """N blocks, padded to W = the widest block's proposal count (pads are 0: use the masks).

    Per-trajectory data (T distinct trajectories) is listed once and shared via `traj_index`.
    The learner's response stream is `committed_*` under `committed_mask` (accepted tokens plus
    the bonus token when it falls inside the block); the rejected stream is `draft_*` under
    `rejected_mask`.
    """

    traj_ids: list[str]  # [T]
    input_ids: list[np.ndarray]  # [T] int32, zero-copy views of the stored rows
    token_logprobs: list[np.ndarray]  # [T] float32 [len]: the target's log-prob of each committed token, NaN in prompts
    features: list[np.ndarray | None]  # [T] float16 [len, F] views; None where not stored
    prompt_len: np.ndarray  # [T]
    draft_version: np.ndarray  # [T]
    traj_index: np.ndarray  # [N] index into the per-trajectory lists
    step: np.ndarray  # [N] verify-step index inside the trajectory
    anchor: np.ndarray  # [N]
    accept_len: np.ndarray  # [N]
    n_draft: np.ndarray  # [N] proposals in the block (B-1)
    draft_tokens: np.ndarray  # [N, W] int32
    draft_logprobs: np.ndarray  # [N, W] float32
    committed_tokens: np.ndarray  # [N, W] int32 input_ids[anchor+1+j] where committed by this block
    committed_logprobs: np.ndarray  # [N, W] float32
    committed_mask: np.ndarray  # [N, W] j <= accept_len, inside the block and inside input_ids
    topk_ids: np.ndarray | None  # [N, W, k]
    topk_logprobs: np.ndarray | None

    def __len__(self) -> int:
        return len(self.anchor)

    @property
    def positions(self) -> np.ndarray:
        return self.anchor[:, None] + 1 + np.arange(self.draft_tokens.shape[1])

    @property
    def accepted_mask(self) -> np.ndarray:
        return np.arange(self.draft_tokens.shape[1]) < self.accept_len[:, None]

    @property
    def rejected_mask(self) -> np.ndarray:
        j = np.arange(self.draft_tokens.shape[1])
        return (j >= self.accept_len[:, None]) & (j < self.n_draft[:, None])

    def item(self, i: int) -> SampledItem:
        t, n, a = self.traj_index[i], self.n_draft[i], self.accept_len[i]
        positions = self.positions[i]
        has_bonus = a < n and self.committed_mask[i, a]
        return SampledItem(
            traj_id=self.traj_ids[t],
            draft_version=int(self.draft_version[t]),
            input_ids=self.input_ids[t],
            prompt_len=int(self.prompt_len[t]),
            features=self.features[t],
            step=int(self.step[i]),
            anchor=int(self.anchor[i]),
            accept_len=int(a),
            draft_tokens=self.draft_tokens[i, :n],
            draft_logprobs=self.draft_logprobs[i, :n],
            accepted_positions=positions[:a],
            accepted_tokens=self.committed_tokens[i, :a],
            accepted_logprobs=self.committed_logprobs[i, :a],
            rejected_positions=positions[a:n],
            rejected_tokens=self.draft_tokens[i, a:n],
            rejected_logprobs=self.draft_logprobs[i, a:n],
            bonus_position=int(positions[a]) if has_bonus else None,
            bonus_token=int(self.committed_tokens[i, a]) if has_bonus else None,
            bonus_logprob=float(self.committed_logprobs[i, a]) if has_bonus else None,
            topk_ids=None if self.topk_ids is None else self.topk_ids[i, :n],
            topk_logprobs=None if self.topk_logprobs is None else self.topk_logprobs[i, :n],
        )


class Sampler:
    """Seeded draws over a store; the row is drawn by its total weight, then a step inside it."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def sample(self, store: TrajectoryStore, n: int, min_version: int | None, blocks_per_row: int = 1) -> SampleBatch:
        """n blocks; with `blocks_per_row` k > 1, ceil(n / k) rows drawn by weight and k steps drawn in each
        (the last row fewer), so a learner that replays a row's blocks together passes fewer contexts. The step
        draw inside a row is the same either way, so each block's distribution is unchanged; only the blocks of
        one batch are no longer independent."""
        if blocks_per_row < 1:
            raise ValueError(f"blocks_per_row must be >= 1 (got {blocks_per_row})")
        row_weight = store.eligible_weights(min_version)
        cum = np.cumsum(row_weight)
        drawn = np.searchsorted(cum, self.rng.integers(0, cum[-1], -(-n // blocks_per_row)), side="right")
        rows = store.rows.start + np.repeat(drawn, blocks_per_row)[:n]
        target = store.rows.take("weight0", rows) + self.rng.integers(0, store.rows.take("weight", rows))
        steps = store.steps.start + np.searchsorted(store.steps.live("cum_weight"), target, side="right")
        return _gather(store, rows, steps)


def _gather(store: TrajectoryStore, rows: np.ndarray, steps: np.ndarray) -> SampleBatch:
    anchor = store.steps.take("anchor", steps)
    accept = store.steps.take("accept", steps)
    n_draft = store.steps.take("n_draft", steps)
    j = np.arange(max(int(n_draft.max()), 1))
    in_block = j < n_draft[:, None]
    draft = np.where(in_block, store.steps.take("draft0", steps)[:, None] + j, store.drafts.start)
    positions = anchor[:, None] + 1 + j
    committed = in_block & (j <= accept[:, None]) & (positions < store.rows.take("length", rows)[:, None])
    token = np.where(committed, store.rows.take("tok0", rows)[:, None] + positions, store.tokens.start)

    def pad(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.where(mask.reshape(mask.shape + (1,) * (values.ndim - 2)), values, 0).astype(values.dtype)

    topk = store.topk > 0
    unique_rows, traj_index = np.unique(rows, return_inverse=True)
    stored = [store.row(int(r)) for r in unique_rows]
    return SampleBatch(
        traj_ids=[s.traj_id for s in stored],
        input_ids=[s.input_ids for s in stored],
        token_logprobs=[
            store.tokens.take("logprob", tok0 + np.arange(n))
            for tok0, n in zip(store.rows.take("tok0", unique_rows), store.rows.take("length", unique_rows))
        ],
        features=[s.features for s in stored],
        prompt_len=store.rows.take("prompt_len", unique_rows),
        draft_version=store.rows.take("version", unique_rows),
        traj_index=traj_index,
        step=steps - store.rows.take("step0", rows),
        anchor=anchor,
        accept_len=accept,
        n_draft=n_draft,
        draft_tokens=pad(store.drafts.take("token", draft), in_block),
        draft_logprobs=pad(store.drafts.take("logprob", draft), in_block),
        committed_tokens=pad(store.tokens.take("token", token), committed),
        committed_logprobs=pad(store.tokens.take("logprob", token), committed),
        committed_mask=committed,
        topk_ids=pad(store.drafts.take("topk_ids", draft), in_block) if topk else None,
        topk_logprobs=pad(store.drafts.take("topk_logprobs", draft), in_block) if topk else None,
    )
