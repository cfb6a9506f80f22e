"""The run configuration: schema, YAML files, overrides, and the errors a user sees."""

from pathlib import Path

import pytest

from launch.config import ConfigError, load_config

CONFIGS = sorted(Path("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.target.testbed or cfg.target.path


def test_overrides_apply_in_order_and_draft_is_a_path_shorthand():
    cfg = load_config("configs/smol.yaml", ["eval.benchmarks=[gsm8k,humaneval]", "eval.num_prompts=4",
                                            "draft=/models/my-draft", "draft.block_size=8"])
    assert cfg.eval.benchmarks == ["gsm8k", "humaneval"] and cfg.eval.num_prompts == 4
    assert cfg.draft.path == "/models/my-draft" and cfg.draft.block_size == 8
    assert cfg.draft.mask_token_id == 16  # from the file


@pytest.mark.parametrize("override, message", [
    ("eval.num_prompt=3", "did you mean 'eval.num_prompts'"),
    ("trget.testbed=tiny", "did you mean 'target'"),
    ("eval.num_prompts=many", "could not be converted"),
    ("draft.block_size=0", "block_size must be >= 1"),
    ("data.gsm8kk=/tmp/x.jsonl", "did you mean data.gsm8k"),
    ("eval.num_prompts", "is not key=value"),
])
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.yaml", [override])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("configs/nope.yaml")
