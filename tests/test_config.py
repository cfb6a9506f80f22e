"""The run configuration: schema, YAML files, overrides, and the errors a user sees."""

from pathlib import Path

import pytest

from draft_opd.launch.config import ConfigError, load_config
from draft_opd.learner.engine import deepspeed_config

CONFIGS = sorted(Path("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.target.testbed or cfg.target.path


def test_overrides_apply_in_order_and_draft_is_a_path_shorthand():
    cfg = load_config(
        "configs/smol.yaml",
        ["eval.benchmarks=[gsm8k,humaneval]", "eval.num_prompts=4", "draft=/models/my-draft", "draft.block_size=8"],
    )
    assert cfg.eval.benchmarks == ["gsm8k", "humaneval"] and cfg.eval.num_prompts == 4
    assert cfg.draft.path == "/models/my-draft" and cfg.draft.block_size == 8
    assert cfg.draft.mask_token_id == 16  # from the file


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.num_prompt=3", "did you mean 'eval.num_prompts'"),
        ("trget.testbed=tiny", "did you mean 'target'"),
        ("eval.num_prompts=many", "could not be converted"),
        ("draft.block_size=0", "block_size must be >= 1"),
        ("data.gsm8kk=/tmp/x.jsonl", "did you mean data.gsm8k"),
        ("eval.num_prompts", "is not key=value"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.yaml", [override])


def test_missing_config_file():
    with pytest.raises(
        ConfigError, match=r"config file not found: configs/nope.yaml; .*\(qwen3-4b, qwen3-8b, smol, tiny\)"
    ):
        load_config("configs/nope.yaml")


def test_a_shipped_config_is_found_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("tiny", "configs/tiny.yaml", "tiny.yaml"):
        assert load_config(name).name == "tiny"
    (tmp_path / "tiny.yaml").write_text("name: mine\ntarget:\n  testbed: tiny\n")
    assert load_config("tiny.yaml").name == "mine"  # a file the user has wins over the shipped one
    with pytest.raises(ConfigError, match="config file not found: elsewhere/tiny.yaml"):
        load_config("elsewhere/tiny.yaml")  # a path to another folder is never taken for a name


def test_opd_from_a_random_draft_without_sft_is_refused_unless_asked_for():
    with pytest.raises(
        ConfigError,
        match=r"train.opd_steps > 0 with train.sft_steps=0 and no draft.path starts OPD "
        r"from a random draft.*pass draft=PATH.*train.allow_random_init_opd=true",
    ):
        load_config("configs/tiny.yaml", ["train.sft_steps=0"])
    for allowed in (["train.allow_random_init_opd=true"], ["draft=/models/sft-draft"], ["train.opd_steps=0"]):
        assert load_config("configs/tiny.yaml", ["train.sft_steps=0", *allowed]).train.sft_steps == 0


@pytest.mark.parametrize("size", ["4b", "8b"])
def test_qwen3_configs_start_opd_from_the_published_draft_as_the_reference_script(size):
    cfg = load_config(f"configs/qwen3-{size}.yaml")
    assert cfg.draft.path == f"z-lab/Qwen3-{size.upper()}-DFlash-b16" and cfg.train.sft_steps == 0
    assert (cfg.objective.opd_decay, cfg.target.thinking, cfg.learner.lr) == (0.8, False, 3e-4)
    assert cfg.learner.lr_schedule == "cosine" and cfg.learner.total_steps == cfg.train.opd_steps
    assert deepspeed_config(cfg.learner)["scheduler"]["type"] == "WarmupCosineLR"
    assert deepspeed_config(load_config("configs/tiny.yaml").learner)["scheduler"]["type"] == "WarmupLR"


@pytest.mark.parametrize(
    "kind, temperature, expect",
    [
        ("dflash", 0.0, {"response_kl": "greedy", "rejected_weight": 0.0, "opd_variant": "k3"}),
        ("dflash", 1.0, {"response_kl": "bernoulli", "rejected_weight": 1.0, "opd_variant": "topk"}),
        ("eagle3", 0.0, {"response_kl": "greedy", "rejected_weight": 0.0, "opd_variant": "k3"}),
        ("eagle3", 0.7, {"response_kl": "bernoulli", "rejected_weight": 1.0, "opd_variant": "topk"}),
    ],
)
def test_auto_preset_picks_the_objective_of_the_drafter_and_serving_temperature(kind, temperature, expect):
    cfg = load_config(
        "configs/tiny.yaml",
        ["objective.preset=auto", f"draft.kind={kind}", f"rollout.temperature={temperature}"],
    )
    assert {k: getattr(cfg.objective, k) for k in expect} == expect
    topk = 20 if expect["opd_variant"] == "topk" else 0  # top-k OPD makes the rollouts record the target's top-k
    assert (cfg.rollout.topk_logprobs, cfg.buffer.topk) == (topk, topk)


def test_a_preset_sits_above_the_yaml_file_and_below_the_command_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        Path("configs/tiny.yaml").read_text() + "\nobjective:\n  rejected_weight: 0.5\n  preset: topk-anchors-only\n"
    )
    cfg = load_config(config)
    assert (cfg.objective.rejected_weight, cfg.objective.opd_variant, cfg.rollout.topk_logprobs) == (0.0, "topk", 20)
    cfg = load_config(config, ["rollout.topk_logprobs=8", "buffer.topk=8"])
    assert (cfg.rollout.topk_logprobs, cfg.buffer.topk, cfg.objective.rejected_weight) == (8, 8, 0.0)


def test_the_full_vocab_preset_is_the_response_streams_full_kl_alone():
    cfg = load_config("configs/tiny.yaml", ["objective.preset=full-vocab"])
    assert (cfg.objective.opd_variant, cfg.objective.rejected_weight) == ("full", 0.0)


@pytest.mark.parametrize("preset", ["paper", "topk", "anchors-only", "greedy-anchors-only", "full-vocab"])
def test_response_only_presets_skip_the_off_text_pass_the_others_keep_it(preset):
    cfg = load_config("configs/tiny.yaml", [f"objective.preset={preset}"])
    assert cfg.rollout.off_text_logprobs == (cfg.objective.rejected_weight > 0)


def test_a_rejected_stream_without_its_recorded_teacher_is_refused_at_load():
    keys = ["objective.preset=greedy-anchors-only", "objective.rejected_weight=0.5"]
    with pytest.raises(ConfigError, match="rejected_weight=0.5 .* rollout.off_text_logprobs=false .* set rollout"):
        load_config("configs/tiny.yaml", keys)
    assert load_config("configs/tiny.yaml", [*keys, "rollout.off_text_logprobs=true"]).objective.rejected_weight == 0.5
    assert load_config("configs/tiny.yaml", [*keys, "train.opd_steps=0"]).train.opd_steps == 0  # no OPD phase


def test_an_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="unknown objective.preset 'greedy-only'.*auto, paper, anchors-only"):
        load_config("configs/tiny.yaml", ["objective.preset=greedy-only"])
