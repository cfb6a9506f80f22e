"""Shared fixtures: the tiny testbed target (seeded random Qwen3) and drafters for it."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_FEATURE_LAYERS = [0, 1, 2]
TINY_MASK = 259


@pytest.fixture(scope="session")
def tiny_target():
    from draft_opd.speculative.target import Target
    from draft_opd.speculative.testbeds import tiny_model, tiny_tokenizer

    return Target(tiny_model(), tiny_tokenizer(), TINY_FEATURE_LAYERS)


def make_drafter(target, kind: str, block_size: int, seed: int = 0, mask_token_id: int = TINY_MASK):
    from draft_opd.speculative.drafter import DrafterConfig
    from draft_opd.speculative.loading import build_drafter

    layers = 2 if kind == "dflash" else 1
    cfg = DrafterConfig(
        kind=kind,
        block_size=block_size,
        num_layers=layers,
        target_layer_ids=TINY_FEATURE_LAYERS,
        mask_token_id=mask_token_id,
    )
    return build_drafter(cfg, target, seed=seed)


def fit_to_text(drafter, refs, steps: int = 60) -> None:
    """A few SFT steps on the references' own text, so that blocks are accepted partly, as a trained draft's."""
    from draft_opd.speculative.text_tau import text_labels

    opt = torch.optim.Adam(drafter.parameters(), lr=3e-3)
    width = drafter.cfg.block_size - 1
    for _ in range(steps):
        for ref in refs:
            ids = torch.tensor(ref.tokens)
            anchors = torch.arange(max(ref.prompt_len - 1, 1), len(ref.tokens) - 1)
            labels, mask = text_labels(ids, anchors, width)
            logits = drafter(ref.features.clone(), ids, anchors, labels[:, : width - 1])
            loss = (
                torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
                * mask.flatten()
            ).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
