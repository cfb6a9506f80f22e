"""Bad input ends in one clear line from `draft-opd` (or a logged skip), never in a silent wrong result.

Every case really happens: broken prompt files are written to disk, impossible settings go through
the command line, too-long prompts reach the tiny target. Covered elsewhere, not repeated here:
unknown keys with a did-you-mean (test_config, test_eval), a missing model (test_target), damaged
buffer segments skipped with a warning naming the file and the fix (test_buffer), more rollout
actors than the cluster holds (test_rollout), library-level prompt-file errors (test_datasets).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ray.exceptions import RayTaskError

from draft_opd.actors.rollout import RolloutConfig, RolloutWorker
from draft_opd.launch.cli import main
from draft_opd.launch.config import job_main
from draft_opd.speculative.decode import DecodeConfig
from draft_opd.speculative.loading import DraftSpec
from draft_opd.speculative.target import TargetConfig
from tests.conftest import TINY_FEATURE_LAYERS, TINY_MASK

TINY_CONTEXT = 4096  # max_position_embeddings of the tiny testbed; its tokenizer is byte-level
LONG = "x" * (TINY_CONTEXT + 100)


def cli_error(*argv: str) -> str:
    """Run `draft-opd ARGV` in-process; it must exit with exactly one line."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    message = exit_info.value.code
    assert isinstance(message, str) and "\n" not in message, message
    return message


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- prompt files -----------------------------------------------------------------------------

PROMPT_FILES = {
    "empty.jsonl": (b"", "file is empty; expected JSON Lines or a JSON list"),
    "cut.jsonl": (
        b'{"question": "fine"}\n{"question": "also fine"}\n{"question": "cut of',
        r"cut.jsonl, line 3: malformed JSON \(Unterminated string.*fix or delete that line",
    ),
    "table.jsonl": (b"question,answer\n1+1,2\n", "table.jsonl, line 1: malformed JSON.*JSON Lines"),
    "data.jsonl": (b"PAR1\x15\x04\x15\xfe\x00binary", "data.jsonl: not UTF-8 text.*convert Parquet"),
    "fields.jsonl": (
        b'{"question": "fine"}\n{"prompt": "wrong field"}\n',
        "fields.jsonl, line 2: missing field 'question'",
    ),
}


@pytest.mark.parametrize("name", PROMPT_FILES)
def test_broken_benchmark_file_is_one_line_naming_file_and_problem(tmp_path, name):
    content, message = PROMPT_FILES[name]
    (tmp_path / name).write_bytes(content)
    error = cli_error("eval", "configs/tiny.yaml", f"data.gsm8k={tmp_path / name}")
    assert error.startswith("draft-opd eval: error: ")
    assert re.search(message, error), error


def test_broken_file_exits_with_status_1_and_one_line_on_stderr(tmp_path):
    bad = tmp_path / "cut.jsonl"
    bad.write_text('{"question": "fine"}\n{"question": \n')
    run = subprocess.run(
        [sys.executable, "-m", "draft_opd.launch.cli", "eval", "configs/tiny.yaml", f"data.gsm8k={bad}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 1
    assert run.stderr.strip() == (
        f"draft-opd eval: error: {bad}, line 2: malformed JSON (Expecting value); "
        "fix or delete that line (a prompt file holds JSON Lines (one JSON object per "
        "line) or one JSON list of objects)"
    )


@pytest.mark.parametrize(
    "content, message",
    [
        ([{"id": "a", "prompt": "fine"}, {"id": "b", "text": "no prompt"}], "line 2: missing field 'prompt'"),
        ([], "file is empty"),
    ],
)
def test_bad_rollout_prompt_file_fails_at_load_not_in_the_actors(tmp_path, content, message):
    path = write_jsonl(tmp_path / "mix.jsonl", content)
    error = cli_error("train", "configs/tiny.yaml", f"rollout.prompts={path}")
    assert error.startswith(f"draft-opd train: error: rollout.prompts: {path}") and message in error


def test_rollout_prompts_need_one_per_actor(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "only one"}])
    assert "1 prompts cannot feed rollout.num_actors=2 actors" in cli_error(
        "train", "configs/tiny.yaml", f"rollout.prompts={path}", "rollout.num_actors=2"
    )


# --- names and impossible settings --------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "eval.benchmarks=[gsm8k,humanevl]",
            "eval.benchmarks: no benchmark named 'humanevl' (did you mean 'humaneval'?)",
        ),
        ("train.eval_benchmark=gsm8kk", "train.eval_benchmark: no benchmark named 'gsm8kk' (did you mean 'gsm8k'?)"),
        (
            "rollout.prompts=gsm8k_trian",
            "rollout.prompts: no benchmark named 'gsm8k_trian' (did you mean 'gsm8k_train'?)",
        ),
        ("rollout.prompts=prompts.txt", "or give a .json/.jsonl file"),
        ("draft.num_layers=0", "bad config: draft.num_layers must be >= 1 (got 0)"),
        ("draft.kind=medusa", "unknown drafter kind 'medusa' (draft.kind)"),
        ("rollout.num_actors=0", "bad config: rollout.num_actors must be >= 1 (got 0)"),
        ("rollout.batch_size=0", "bad config: rollout.batch_size must be >= 1 (got 0)"),
        ("rollout.max_new_tokens=0", "bad config: rollout.max_new_tokens must be >= 1 (got 0)"),
        ("rollout.temperature=-0.5", "bad config: rollout.temperature must be >= 0 (got -0.5)"),
        ("rollout.num_prompts=0", "bad config: rollout.num_prompts must be >= 1 (got 0)"),
        ("learner.batch_size=0", "bad config: learner.batch_size must be >= 1 (got 0)"),
        ("learner.world_size=0", "bad config: learner.world_size must be >= 1 (got 0)"),
        ("learner.zero_stage=4", "bad config: learner.zero_stage must be 0, 1, 2 or 3 (got 4)"),
        ("buffer.capacity=0", "bad config: buffer: capacity=0 must be at least 1"),
        ("buffer.sample_policy=greedy", "bad config: buffer: sample_policy='greedy' is unknown"),
        ("train.publish_every=0", "bad config: train.publish_every must be >= 1 (got 0)"),
        ("train.opd_steps=-3", "bad config: train.opd_steps must be >= 0 (got -3)"),
        ("eval.num_prompts=0", "bad config: eval.num_prompts must be >= 1 (got 0)"),
        ("eval.temperature=-1", "bad config: eval.temperature must be >= 0 (got -1.0)"),
    ],
)
def test_impossible_setting_names_the_key(override, message):
    assert message in cli_error("train", "configs/tiny.yaml", override)


def test_decode_config_refuses_what_would_silently_decode_otherwise():
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        DecodeConfig(max_new_tokens=0)  # would still commit the prefill's token
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        DecodeConfig(temperature=-0.1)  # would silently mean greedy


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "draft.target_layer_ids=[0,5]",
            "draft.target_layer_ids: feature layers [5] out of range for a 4-layer target",
        ),
        ("draft.mask_token_id=100000", "draft.mask_token_id=100000 is not a token of this target"),
    ],
)
def test_drafter_settings_the_target_cannot_serve(override, message):
    assert message in cli_error("eval", "configs/tiny.yaml", "draft.init=random", override)


def test_missing_model_is_one_line():
    error = cli_error("eval", "configs/tiny.yaml", "target.testbed=null", "target.path=/nonexistent/model")
    assert "cannot load target '/nonexistent/model'" in error and "Fix: set target.path" in error


def test_error_inside_a_ray_actor_reaches_the_user_as_its_own_message():
    def job(cfg):
        raise RayTaskError(
            "run", "Traceback (most recent call last):\n  ...", ValueError("the real problem")
        ).as_instanceof_cause()

    with pytest.raises(SystemExit, match=r"^draft-opd train: error: the real problem$"):
        job_main(job, "train", ["configs/tiny.yaml"])


# --- prompts longer than the context ----------------------------------------------------------


def test_eval_refuses_a_prompt_too_long_before_decoding(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"question": "short"}, {"question": LONG}])
    error = cli_error("eval", "configs/tiny.yaml", f"data.gsm8k={path}", "draft.init=random")
    assert "gsm8k/1, turn 1: prompt of" in error and f"exceeds the target's context of {TINY_CONTEXT}" in error
    assert "lower eval.max_new_tokens, or leave this prompt out (data.gsm8k=PATH" in error


def rollout_worker(prompts: Path) -> RolloutWorker:
    draft = DraftSpec(
        kind="dflash",
        block_size=4,
        num_layers=1,
        target_layer_ids=TINY_FEATURE_LAYERS,
        mask_token_id=TINY_MASK,
        init="random",
    )
    return RolloutWorker(TargetConfig(testbed="tiny"), draft, RolloutConfig(prompts=str(prompts), max_new_tokens=8))


def test_rollout_skips_a_prompt_too_long_with_a_warning(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", [{"id": "long", "prompt": LONG}, {"id": "short", "prompt": "hi"}])
    worker = rollout_worker(path)
    with pytest.warns(UserWarning, match=r"rollout-0: skipped prompt mix/long@0: prompt of \d+ tokens.*exceeds"):
        trajectory = worker.rollout()
    assert trajectory.traj_id == "mix/short@0" and len(trajectory.input_ids) > trajectory.prompt_len
    assert worker.pool.position == 2  # the skipped prompt is consumed: a resumed stream does not retry it


def test_rollout_with_only_too_long_prompts_fails_instead_of_looping(tmp_path):
    worker = rollout_worker(write_jsonl(tmp_path / "long.jsonl", [{"prompt": LONG}, {"prompt": LONG + "y"}]))
    with (
        pytest.warns(UserWarning, match="skipped prompt"),
        pytest.raises(
            ValueError,
            match="rollout-0: none of its 2 prompts .* fits the target's context with "
            "rollout.max_new_tokens=8; lower rollout.max_new_tokens",
        ),
    ):
        worker.rollout()
