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
