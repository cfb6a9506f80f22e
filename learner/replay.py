"""Error-position replay: the current draft re-drafts the sampled blocks; gather what the losses need.

For each trajectory in a sampled batch, the draft replays every sampled anchor in one pass
(`replay_logits`), conditioned on the target features of the prefix (stored in the buffer, or
recomputed by a frozen target copy). The student's log-probs are gathered at the committed
tokens (response stream) and at the proposals (rejected stream); the teacher's come from the
rollout records, so replay costs no target pass when features are stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from draft_opd.buffer import SampleBatch
from draft_opd.learner.losses import UNREACHABLE_LOGP
from draft_opd.speculative.drafter import Drafter
from draft_opd.speculative.text_tau import text_labels


class TargetSource:
    """What the losses ask of the frozen target about a sampled row: its features (the buffer's stored fp16 copy
    when it has one, else a target pass) and its next-token log-probs at every position (always a target pass:
    soft-label SFT and the full-vocabulary OPD variant, whose teacher is the whole distribution)."""

    def __init__(self, target):
        self.target = target

    def __call__(self, input_ids: np.ndarray, stored: np.ndarray | None) -> torch.Tensor:
        """Features [T, F] of the row."""
        if stored is not None:
            return torch.from_numpy(stored.astype(np.float32))
        return self.target.forward(torch.from_numpy(input_ids.astype(np.int64)), 0, None).features

    def logprobs(self, input_ids: np.ndarray) -> torch.Tensor:
        """[T, V] fp32: row i is log p(. | input_ids[: i + 1]), the target's distribution of token i + 1."""
        out = self.target.forward(torch.from_numpy(input_ids.astype(np.int64)), 0, None, with_features=False)
        return torch.log_softmax(out.logits.float(), dim=-1)

    def at_blocks(self, input_ids: np.ndarray, anchors: torch.Tensor, width: int) -> torch.Tensor:
        """[n, width, V]: the target's distribution of each block position, the token at anchor + 1 + j; positions
        past the row's end repeat its last row (the losses mask them)."""
        logp = self.logprobs(input_ids)
        return logp[(anchors[:, None] + torch.arange(width)).clamp_max(logp.shape[0] - 1)]


@dataclass
class ReplayTerms:
    """Aligned [N, W] tensors in the batch's item order."""

    student_logp: torch.Tensor  # [N, W, V] log-softmax of the re-drafted blocks
    committed_tokens: torch.Tensor
    committed_mask: torch.Tensor
    teacher_committed_logp: torch.Tensor
    draft_tokens: torch.Tensor
    rejected_mask: torch.Tensor
    teacher_draft_logp: torch.Tensor

    def student_at(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.student_logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def student_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """fp32 log-softmax (OPD's log-ratios need fp32), floored at UNREACHABLE_LOGP: tokens outside a reduced
    draft vocabulary."""
    return torch.log_softmax(logits.float(), dim=-1).clamp_min(UNREACHABLE_LOGP)


def drafter_of(model) -> Drafter:
    """The drafter behind a DeepSpeed engine (or the drafter itself)."""
    return getattr(model, "module", model)


def replay_block_logits(
    model,
    features: torch.Tensor,
    input_ids: torch.Tensor,
    anchors: torch.Tensor,
    chain_tokens: torch.Tensor,
    width: int,
    widths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [n, width, V], in the drafter's dtype, of blocks re-drafted at `anchors` through `model` (a drafter
    or its engine); chain drafters are fed `chain_tokens` [n, width-1]; `widths` [n] are the proposals each block
    drafted (Drafter.forward), None for full blocks."""
    drafter = drafter_of(model)
    if drafter.cfg.kind == "eagle3":
        anchors = anchors.clamp_min(1)  # a chain needs one prefix pair; such items are masked out
    features = features.to(next(drafter.parameters()).dtype)  # a bf16 engine trains bf16 weights on fp32 features
    return model(features, input_ids, anchors, chain_tokens[:, : width - 1], widths)


def replay(model, batch: SampleBatch, features: TargetSource) -> ReplayTerms:
    width = batch.draft_tokens.shape[1]
    draft_tokens = torch.from_numpy(batch.draft_tokens.astype(np.int64))
    logits = [None] * len(batch)
    for t in np.unique(batch.traj_index):
        items = np.nonzero(batch.traj_index == t)[0]
        ids = torch.from_numpy(batch.input_ids[t].astype(np.int64))
        anchors = torch.from_numpy(batch.anchor[items].astype(np.int64))
        drafted = torch.from_numpy(batch.n_draft[items].astype(np.int64))  # < width in a block max_new_tokens cut
        block = replay_block_logits(
            model, features(batch.input_ids[t], batch.features[t]), ids, anchors, draft_tokens[items], width, drafted
        )
        for row, i in enumerate(items):
            logits[i] = block[row]
    valid = torch.ones(len(batch), dtype=torch.bool)
    if drafter_of(model).cfg.kind == "eagle3":  # a chain needs one prefix pair before its anchor
        valid = torch.from_numpy(batch.anchor >= 1)
    student = student_log_probs(torch.stack(logits))
    committed = torch.from_numpy(batch.committed_tokens.astype(np.int64))
    teacher_draft = torch.tensor(batch.draft_logprobs)
    recorded = teacher_draft.isfinite()  # NaN: a rollout without the off-text pass (rollout.off_text_logprobs)
    return ReplayTerms(
        student_logp=student,
        committed_tokens=committed,
        committed_mask=torch.tensor(batch.committed_mask).float() * valid[:, None] * reachable(student, committed),
        teacher_committed_logp=torch.tensor(batch.committed_logprobs),
        draft_tokens=draft_tokens,
        rejected_mask=torch.tensor(batch.rejected_mask).float() * valid[:, None] * recorded,
        teacher_draft_logp=teacher_draft.nan_to_num(0.0),
    )


def reachable(student_logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[N, W] float: 1 where the draft can propose the token (always, but outside a reduced draft vocabulary)."""
    return (student_logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1) > UNREACHABLE_LOGP).float()


def random_text_anchors(batch: SampleBatch, t: int, count: int, lowest: int, rng: np.random.Generator) -> torch.Tensor:
    """`count` anchors drawn uniformly in trajectory t's text, from its last prompt token to its second-to-last
    token (so each has a label); `lowest` is the first anchor the drafter can take."""
    lo = max(int(batch.prompt_len[t]) - 1, lowest)
    return torch.from_numpy(rng.integers(lo, max(len(batch.input_ids[t]) - 1, lo + 1), size=count))


def replay_random_anchors(model, batch: SampleBatch, features: TargetSource, rng: np.random.Generator) -> ReplayTerms:
    """The ablation of rollout anchors: as many blocks per trajectory as the batch sampled, re-drafted at random
    anchors of the rollouts' text. The current draft's greedy proposals there decide the accepted prefix; the
    response stream is that prefix plus the first error's target token, with the rollout's teacher log-probs.
    The rejected stream is empty: the target never scored these proposals. Items are grouped by trajectory."""
    drafter = drafter_of(model)
    width = drafter.cfg.block_size - 1
    lowest = 1 if drafter.cfg.kind == "eagle3" else 0
    logits, labels, exists, teacher = [], [], [], []
    for t, count in zip(*np.unique(batch.traj_index, return_counts=True)):
        ids = torch.from_numpy(batch.input_ids[t].astype(np.int64))
        anchors = random_text_anchors(batch, t, int(count), lowest, rng)
        label, mask = text_labels(ids, anchors, width)
        logits.append(
            replay_block_logits(model, features(batch.input_ids[t], batch.features[t]), ids, anchors, label, width)
        )
        positions = (anchors[:, None] + 1 + torch.arange(width)).clamp_max(ids.shape[0] - 1)
        teacher.append(torch.from_numpy(batch.token_logprobs[t])[positions])
        labels.append(label)
        exists.append(mask)
    logits, labels, exists = torch.cat(logits), torch.cat(labels), torch.cat(exists)
    proposals = logits.argmax(-1)
    accepted = ((proposals == labels) & exists).long().cumprod(dim=1).sum(dim=1)
    committed = exists & (torch.arange(width)[None, :] <= accepted[:, None])
    none = torch.zeros(labels.shape)
    student = student_log_probs(logits)
    return ReplayTerms(
        student_logp=student,
        committed_tokens=labels,
        committed_mask=committed.float() * reachable(student, labels),
        teacher_committed_logp=torch.where(committed, torch.cat(teacher).float(), 0.0),
        draft_tokens=proposals,
        rejected_mask=none,
        teacher_draft_logp=none,
    )
