"""Target loading and the frozen forward: logits and features equal the Hugging Face model's own."""

import pytest
import torch

from draft_opd.speculative.pretrained import TargetNotFoundError
from draft_opd.speculative.target import Target, TargetConfig, load_target
from draft_opd.speculative.testbeds import tiny_model, tiny_tokenizer


def test_forward_matches_the_hf_model_logits_and_hidden_states():
    model = tiny_model()
    ids = torch.randint(0, 250, (1, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True)
    target = Target(tiny_model(), tiny_tokenizer(), [0, 2])
    out = target.forward(ids[0], 0, None)
    torch.testing.assert_close(out.logits, ref.logits[0], atol=1e-5, rtol=1e-5)
    expected = torch.cat([ref.hidden_states[1][0], ref.hidden_states[3][0]], dim=-1)
    torch.testing.assert_close(out.features, expected, atol=1e-5, rtol=1e-5)


def test_cached_forward_continues_a_prefix_exactly():
    target = Target(tiny_model(), None, [1])
    ids = torch.randint(0, 250, (30,), generator=torch.Generator().manual_seed(1))
    full = target.forward(ids, 0, None)
    cache = target.new_cache()
    target.forward(ids[:17], 0, cache)
    tail = target.forward(ids[17:], 17, cache)
    torch.testing.assert_close(tail.logits, full.logits[17:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tail.features, full.features[17:], atol=1e-5, rtol=1e-5)


def test_target_is_frozen():
    target = Target(tiny_model(), None, [1])
    assert not any(p.requires_grad for p in target.model.parameters())
    assert not target.model.training


def test_feature_layer_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="out of range"):
        Target(tiny_model(), None, [3])


@pytest.mark.parametrize("path", ["/nonexistent/model-dir", "./missing-model", "/tmp/none/model.gguf"])
def test_missing_model_path_fails_with_the_fix(path):
    with pytest.raises(TargetNotFoundError, match="Fix: set target.path"):
        load_target(TargetConfig(path=path))


def test_unreachable_hub_id_fails_with_the_fix(monkeypatch):
    """The hub is out of reach here; offline mode makes that fail at once instead of after retries."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TargetNotFoundError, match="HF_HUB_OFFLINE"):
        load_target(TargetConfig(path="draft-opd-tests/no-such-model"))


def test_local_directory_loads(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    target = load_target(TargetConfig(path=str(tmp_path)), [1])
    ids = torch.arange(5)
    torch.testing.assert_close(
        target.forward(ids, 0, None).logits, Target(tiny_model(), None, [1]).forward(ids, 0, None).logits
    )
    assert target.tokenizer.eos_token_id == 258


def test_unprepared_smol_testbed_names_make_smol(monkeypatch, tmp_path):
    monkeypatch.setenv("DRAFT_OPD_CACHE", str(tmp_path))
    with pytest.raises(TargetNotFoundError, match="make smol"):
        load_target(TargetConfig(testbed="smol"))
