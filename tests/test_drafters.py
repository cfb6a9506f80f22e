"""Drafter construction, defaults from the anchors, and save/load round trips."""

import pytest
import torch

from draft_opd.speculative.decode import DecodeConfig, generate
from draft_opd.speculative.drafter import DrafterConfig, ProposeRequest, default_layer_ids
from draft_opd.speculative.loading import build_drafter, load_drafter
from tests.conftest import make_drafter


def test_default_feature_layers_follow_the_anchors():
    assert default_layer_ids("dflash", 36, 5) == [1, 9, 17, 25, 33]  # Qwen3-4B/8B
    assert default_layer_ids("eagle3", 36, 1) == [1, 17, 32]


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        DrafterConfig(block_size=0)
    with pytest.raises(ValueError, match="unknown drafter kind"):
        DrafterConfig(kind="medusa")


def test_dflash_needs_a_mask_token(tiny_target):
    with pytest.raises(ValueError, match="mask_token_id"):
        build_drafter(DrafterConfig(kind="dflash", target_layer_ids=[0, 1, 2]), tiny_target)


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_shared_target_weights_are_not_saved_or_trained(tiny_target, kind):
    drafter = make_drafter(tiny_target, kind, 4)
    names = set(drafter.state_dict())
    assert not any("embed" in n for n in names)
    shared = {tiny_target.embed_tokens.weight.data_ptr(), tiny_target.lm_head.weight.data_ptr()}
    assert all(p.data_ptr() not in shared for p in drafter.parameters())
    assert all(p.requires_grad for p in drafter.parameters())


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_saved_drafter_reloads_to_identical_outputs(tiny_target, kind, tmp_path):
    drafter = make_drafter(tiny_target, kind, 8, seed=3)
    with torch.no_grad():
        for p in drafter.parameters():  # move away from init so a reload that re-inits would be caught
            p.add_(torch.randn_like(p) * 0.05)
    drafter.save(tmp_path / "d")
    assert (tmp_path / "d" / "config.json").exists() and (tmp_path / "d" / "model.safetensors").exists()
    loaded = load_drafter(tmp_path / "d", tiny_target)
    assert loaded.cfg == drafter.cfg
    prompt = list(range(40, 60))
    state_a = drafter.begin(tiny_target.forward(torch.tensor(prompt), 0, None).features, torch.tensor(prompt))
    state_b = loaded.begin(tiny_target.forward(torch.tensor(prompt), 0, None).features, torch.tensor(prompt))
    pick = lambda x: x.argmax(-1)  # noqa: E731
    _, logits_a = drafter.propose(state_a, torch.tensor(7), len(prompt), 7, pick)
    _, logits_b = loaded.propose(state_b, torch.tensor(7), len(prompt), 7, pick)
    assert torch.equal(logits_a, logits_b)
    cfg = DecodeConfig(max_new_tokens=24)
    assert generate(tiny_target, prompt, drafter, cfg).steps == generate(tiny_target, prompt, loaded, cfg).steps


def test_loading_a_missing_drafter_names_the_files(tiny_target, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json and model.safetensors"):
        load_drafter(tmp_path, tiny_target)


def test_drafter_for_another_target_is_refused(tiny_target, tmp_path):
    from draft_opd.speculative.target import Target
    from draft_opd.speculative.testbeds import tiny_model

    make_drafter(tiny_target, "eagle3", 4).save(tmp_path)
    other = Target(tiny_model(hidden_size=32, head_dim=8), None, [0, 1, 2])
    with pytest.raises(ValueError, match="built for a target with hidden 64"):
        load_drafter(tmp_path, other)


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_rows_drafted_together_equal_rows_drafted_alone(tiny_target, kind):
    """propose_rows (one LM-head pass over every row for DFlash) gives each row what propose gives it alone:
    the same tokens, logits to fp32 rounding, and drafter states that continue identically."""
    drafter = make_drafter(tiny_target, kind, 8, seed=5)
    prompts = [list(range(40, 60)), list(range(70, 83)), list(range(90, 121))]
    widths = [7, 3, 5]  # blocks cut short by max_new_tokens propose fewer

    def states():
        return [drafter.begin(tiny_target.forward(torch.tensor(p), 0, None).features, torch.tensor(p)) for p in prompts]

    pick = lambda x: x.argmax(-1)  # noqa: E731
    alone_states, together_states = states(), states()
    alone = [
        drafter.propose(s, torch.tensor(7 + i), len(p), n, pick)
        for i, (s, p, n) in enumerate(zip(alone_states, prompts, widths))
    ]
    requests = [
        ProposeRequest(s, torch.tensor(7 + i), len(p), n, pick)
        for i, (s, p, n) in enumerate(zip(together_states, prompts, widths))
    ]
    together = drafter.propose_rows(requests)
    for (tokens_a, logits_a), (tokens_t, logits_t), n in zip(alone, together, widths):
        assert tokens_a.shape == (n,) and torch.equal(tokens_a, tokens_t)
        torch.testing.assert_close(logits_t, logits_a, rtol=1e-5, atol=1e-5)
    for a, t in zip(alone_states, together_states):
        assert a.pending_start == t.pending_start and len(a.cache) == len(t.cache)
