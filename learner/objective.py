"""The training objective of a phase on one sampled batch: SFT (the DFlash/EAGLE-3 baselines) or Draft-OPD.

Both phases read the same rollouts. At T = 0 a trajectory's committed tokens are the target's
own greedy text, so SFT trains on random anchors in that text with hard labels (the DFlash
recipe; for EAGLE-3 the training-time-test chain is fed the true tokens). OPD replays the
recorded anchors on the draft's own proposals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from draft_opd.buffer import SampleBatch
from draft_opd.learner.losses import (
    REJECTED_CLAMPS,
    RESPONSE_KLS,
    dflash_sft_loss,
    draft_opd_loss,
    eagle3_sft_loss,
    full_forward_kl,
    greedy_conflict_shares,
    topk_forward_kl,
    topk_total_variation,
)
from draft_opd.learner.presets import PRESET_NAMES
from draft_opd.learner.replay import (
    TargetSource,
    drafter_of,
    random_text_anchors,
    replay,
    replay_block_logits,
    replay_random_anchors,
)
from draft_opd.speculative.text_tau import text_labels

OPD_ANCHORS = ("rollout", "random")
OPD_VARIANTS = ("k3", "topk", "full")
SFT_TARGETS = ("hard", "soft")


@dataclass
class ObjectiveConfig:
    opd_decay: float = 0.9  # rejected-stream weight decay^(offset-1); the GSM8K script used 0.8
    sft_gamma: float = 7.0  # DFlash position weight exp(-(k-1)/gamma)
    eagle_decay: float = 0.8  # EAGLE-3 step weight decay^i
    # k3: the paper's sampled estimators; topk: exact forward KL + TV from stored top-k; full: the response
    # stream's forward KL over the full vocabulary, p from a target pass over the row (the reference's EAGLE-3 path)
    opd_variant: str = "k3"
    opd_max_staleness: int | None = None  # OPD samples only rows drafted at most this many versions ago
    # k3 on the rejected stream: reference clamps log(p/q) to +-20 (a capped token gets no gradient, as in the
    # Draft-OPD code); floor floors both log-probs at -10 first (such a token is pushed down in full)
    rejected_clamp: str = "reference"
    # SFT anchors drawn in the text of each sampled row: a step's learner.batch_size blocks then come from
    # batch_size / this rows, so one row's target features serve many blocks (DFlash trains many anchors per
    # sequence); 1 draws one anchor per sampled block
    sft_anchors_per_row: int = 1
    # OPD's blocks drawn from each sampled row (its verify steps, by the buffer's policy, with replacement): for
    # the same reason, one row's features and one drafter pass over its context serve all of them
    opd_blocks_per_row: int = 1
    # SFT's labels: hard (the text's tokens: the DFlash/EAGLE-3 recipe) or soft (forward KL to the target's full
    # distribution at each label position, from one target pass per sampled row)
    sft_targets: str = "hard"
    rejected_weight: float = 1.0  # scales the rejected stream (k3's decayed weights, topk's TV); 0: response only
    sft_mix: float = 0.0  # OPD loss + sft_mix * the SFT loss on random anchors of the same rows (a mixed loss)
    # k3's response stream: bernoulli (the paper's forward KL of the accept event to p) or greedy (cross-entropy on
    # the committed tokens: the forward KL to the one-hot greedy target that T = 0 verification accepts against)
    response_kl: str = "bernoulli"
    # where OPD replays blocks: rollout (the anchors the rollout drafted at) or random (an ablation: random anchors
    # in the rollouts' text, the response stream only; see learner.replay.replay_random_anchors)
    opd_anchors: str = "rollout"
    # a named objective (learner.presets: paper, greedy-anchors-only, topk, ...) or auto, the winner for draft.kind
    # at rollout.temperature; applied at config load, above the YAML file and below the command line
    preset: str | None = None

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESET_NAMES:
            raise ValueError(f"unknown objective.preset {self.preset!r}; use one of {', '.join(PRESET_NAMES)}")
        if self.rejected_weight < 0 or self.sft_mix < 0:
            raise ValueError(
                f"objective.rejected_weight and objective.sft_mix must be >= 0 "
                f"(got {self.rejected_weight}, {self.sft_mix})"
            )
        for key in ("sft_anchors_per_row", "opd_blocks_per_row"):
            if getattr(self, key) < 1:
                raise ValueError(f"objective.{key} must be >= 1 (got {getattr(self, key)})")
        if self.rejected_clamp not in REJECTED_CLAMPS:
            raise ValueError(f"objective.rejected_clamp must be one of {REJECTED_CLAMPS} (got {self.rejected_clamp!r})")
        if self.response_kl not in RESPONSE_KLS:
            raise ValueError(f"objective.response_kl must be one of {RESPONSE_KLS} (got {self.response_kl!r})")
        if self.opd_anchors not in OPD_ANCHORS:
            raise ValueError(f"objective.opd_anchors must be one of {OPD_ANCHORS} (got {self.opd_anchors!r})")
        if self.opd_variant not in OPD_VARIANTS:
            raise ValueError(f"objective.opd_variant must be one of {OPD_VARIANTS} (got {self.opd_variant!r})")
        if self.sft_targets not in SFT_TARGETS:
            raise ValueError(f"objective.sft_targets must be one of {SFT_TARGETS} (got {self.sft_targets!r})")
        if self.opd_anchors == "random" and self.opd_variant != "k3":
            raise ValueError(
                "objective.opd_anchors=random needs objective.opd_variant=k3: the other variants' teacher "
                "terms are gathered at the rollout's anchors"
            )
        if self.opd_variant == "full" and self.rejected_weight > 0:
            raise ValueError(
                "objective.opd_variant=full has no rejected stream (a target pass over the text knows no "
                "off-text proposals): set objective.rejected_weight=0"
            )


def sft_loss(
    model, batch: SampleBatch, features: TargetSource, cfg: ObjectiveConfig, rng: np.random.Generator
) -> dict[str, torch.Tensor]:
    """Random anchors in the committed text: objective.sft_anchors_per_row for each block the batch sampled."""
    drafter = drafter_of(model)
    width = drafter.cfg.block_size - 1
    logits, labels, masks, teachers = [], [], [], []
    lowest = 1 if drafter.cfg.kind == "eagle3" else 0
    for t, count in zip(*np.unique(batch.traj_index, return_counts=True)):
        ids = torch.from_numpy(batch.input_ids[t].astype(np.int64))
        anchors = random_text_anchors(batch, t, count * cfg.sft_anchors_per_row, lowest, rng)
        label, mask = text_labels(ids, anchors, width)
        logits.append(
            replay_block_logits(model, features(batch.input_ids[t], batch.features[t]), ids, anchors, label, width)
        )
        labels.append(label)
        masks.append(mask)
        if cfg.sft_targets == "soft":
            teachers.append(features.at_blocks(batch.input_ids[t], anchors, width))
    logits, labels = torch.cat(logits), torch.cat(labels)
    mask = torch.cat(masks).float() * logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1).isfinite()
    teacher = torch.cat(teachers) if teachers else None
    if drafter.cfg.kind == "eagle3":
        loss = eagle3_sft_loss(logits, labels, mask, cfg.eagle_decay, teacher)
    else:
        loss = dflash_sft_loss(logits, labels, mask, cfg.sft_gamma, teacher)
    accuracy = ((logits.argmax(-1) == labels).float() * mask).sum() / mask.sum().clamp_min(1)
    return {
        "loss": loss,
        "token_accuracy": accuracy.detach(),
        "blocks": torch.tensor(float(len(labels))),
        "tokens": mask.sum(),
    }


def opd_loss(
    model, batch: SampleBatch, features: TargetSource, cfg: ObjectiveConfig, rng: np.random.Generator
) -> dict[str, torch.Tensor]:
    """The OPD variant's loss terms plus, for either variant, the greedy-conflict shares of the sampled streams."""
    if cfg.opd_anchors == "random":
        terms = replay_random_anchors(model, batch, features, rng)
    else:
        terms = replay(model, batch, features)
    streams = (
        terms.teacher_committed_logp,
        terms.student_at(terms.committed_tokens),
        terms.committed_mask,
        terms.teacher_draft_logp,
        terms.student_at(terms.draft_tokens),
        terms.rejected_mask,
    )
    if cfg.opd_variant == "topk":
        out = topk_opd_loss(terms, batch, cfg.rejected_weight)
    elif cfg.opd_variant == "full":
        out = full_opd_loss(terms, batch, features)
    else:
        out = draft_opd_loss(
            *streams,
            decay=cfg.opd_decay,
            rejected_clamp=cfg.rejected_clamp,
            rejected_weight=cfg.rejected_weight,
            response_kl=cfg.response_kl,
        )
    return {**out, **greedy_conflict_shares(*streams)}


def full_opd_loss(terms, batch: SampleBatch, features: TargetSource) -> dict[str, torch.Tensor]:
    """The response stream's forward KL over the full vocabulary, p from one target pass over each sampled row's
    text: the rollout's anchors and accept lengths decide the positions, the whole distribution the target."""
    width = batch.draft_tokens.shape[1]
    teacher = torch.empty_like(terms.student_logp)
    for t in np.unique(batch.traj_index):
        items = np.nonzero(batch.traj_index == t)[0]
        anchors = torch.from_numpy(batch.anchor[items].astype(np.int64))
        teacher[torch.from_numpy(items)] = features.at_blocks(batch.input_ids[t], anchors, width)
    resp = full_forward_kl(teacher, terms.student_logp, terms.committed_mask)
    return {"loss": resp, "resp_kl": resp}


def topk_opd_loss(terms, batch: SampleBatch, rejected_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Beyond the paper: exact forward KL on the response stream and TV on the rejected stream, from the
    teacher's top-k at every draft position (needs rollout.topk_logprobs > 0)."""
    if batch.topk_ids is None:
        raise ValueError(
            "objective.opd_variant=topk needs the teacher's top-k in the buffer: "
            "set rollout.topk_logprobs (e.g. 20) and buffer.topk to the same k"
        )
    ids = torch.from_numpy(batch.topk_ids.astype(np.int64))
    logp = torch.tensor(batch.topk_logprobs).nan_to_num(0.0)  # NaN: not recorded, outside terms.rejected_mask
    resp = topk_forward_kl(logp, ids, terms.student_logp, terms.committed_mask)
    rej = topk_total_variation(logp, ids, terms.student_logp, terms.rejected_mask)
    return {"loss": resp + rejected_weight * rej, "resp_kl": resp, "rej_tv": rej}


def phase_loss(
    phase: str, model, batch: SampleBatch, features: TargetSource, cfg: ObjectiveConfig, rng: np.random.Generator
) -> dict[str, torch.Tensor]:
    if phase == "sft":
        return sft_loss(model, batch, features, cfg, rng)
    if phase == "opd":
        out = opd_loss(model, batch, features, cfg, rng)
        if cfg.sft_mix:
            sft = sft_loss(model, batch, features, cfg, rng)
            out.update(loss=out["loss"] + cfg.sft_mix * sft["loss"], sft_loss=sft["loss"])
        return out
    raise ValueError(f"unknown phase {phase!r}; use sft or opd")
