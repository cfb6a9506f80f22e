"""Named OPD objectives (`objective.preset`), and `auto`: the objective that wins for a drafter and a serving
temperature.

A preset is a list of config overrides: the settings of one objective in the study's arms (`make study`), which
may reach beyond the objective section (top-k OPD needs the rollouts to record the target's top-k). It applies
above the YAML file and below the command line, so a key given there still wins.

`auto` reads the drafter kind (`draft.kind`) and the temperature the draft is trained for, which is the
rollouts' (`rollout.temperature`: on-policy rollouts sample as serving does). Cells the study has measured
name their winner; the others name the objective built for that cell's acceptance rule, until measured:
at T = 0 a proposal is accepted when it equals the target's argmax (the greedy cross-entropy), at T > 0 with
probability 1 - TV(p, q) (the exact top-k forward KL and TV). docs/results/study.md holds the map.
"""

from __future__ import annotations

TOPK = ["objective.opd_variant=topk", "rollout.topk_logprobs=20", "buffer.topk=20"]
# no rejected stream: its teacher past a block's first mismatch, a third of a parallel rollout, is not computed
RESPONSE_ONLY = ["objective.rejected_weight=0", "rollout.off_text_logprobs=false"]
PRESETS: dict[str, list[str]] = {
    "paper": [],  # the paper's defaults: forward KL of the accept event + k3 on the rejected stream
    "anchors-only": RESPONSE_ONLY,
    "decay1": ["objective.opd_decay=1.0"],
    "topk": TOPK,
    "topk-anchors-only": [*TOPK, *RESPONSE_ONLY],  # the response stream's exact forward KL alone
    "mixed": ["objective.sft_mix=1.0"],
    # random anchors in the rollouts' text instead of the rollout's own; the response stream only
    "random-anchors": ["objective.opd_anchors=random"],
    # beyond the paper: the response stream's forward KL to the one-hot greedy target, which T = 0 accepts against
    "greedy": ["objective.response_kl=greedy"],
    "greedy-anchors-only": ["objective.response_kl=greedy", *RESPONSE_ONLY],
    # the reference's EAGLE-3 path: the response stream's forward KL over the full vocabulary, no rejected stream
    "full-vocab": ["objective.opd_variant=full", *RESPONSE_ONLY],
}
AUTO: dict[tuple[str, bool], str] = {  # (draft.kind, serving temperature > 0) -> preset
    ("dflash", False): "greedy-anchors-only",  # measured: the study's best arm at T = 0 (docs/results/study.md)
    ("dflash", True): "topk",  # not yet measured
    ("eagle3", False): "greedy-anchors-only",  # not yet measured
    ("eagle3", True): "topk",  # not yet measured
}
PRESET_NAMES = ("auto", *PRESETS)


def auto_preset(kind: str, temperature: float) -> str:
    """The preset `auto` picks for a drafter kind served at `temperature`."""
    if (kind, temperature > 0) not in AUTO:
        raise ValueError(
            f"objective.preset=auto knows no drafter kind {kind!r}; use one of {sorted({k for k, _ in AUTO})}"
        )
    return AUTO[kind, temperature > 0]


def preset_overrides(preset: str, kind: str, temperature: float) -> list[str]:
    """The config overrides of a preset (`auto` resolved for the drafter kind and serving temperature)."""
    name = auto_preset(kind, temperature) if preset == "auto" else preset
    if name not in PRESETS:
        raise ValueError(f"unknown objective.preset {preset!r}; use one of {', '.join(PRESET_NAMES)}")
    return PRESETS[name]
