"""Benchmark prompt loaders: shipped files, the public formats of unshipped sets, and errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from draft_opd.prompts.sets import (
    BENCHMARKS,
    DATA_ENV,
    MATH_SUFFIX,
    MBPP_SPLITS,
    Conversation,
    PromptFileNotFoundError,
    PromptFormatError,
    UnknownBenchmarkError,
    default_data_dir,
    load_benchmark,
    load_prompt_file,
)

FIXTURES = Path(__file__).parent / "fixtures"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --- shipped files ----------------------------------------------------------------------------


def test_default_data_dir_holds_the_shipped_files(monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert (default_data_dir() / "gsm8k_test.jsonl").is_file()


@pytest.mark.parametrize(
    "name, count",
    [("gsm8k", 1319), ("gsm8k_train", 7473), ("humaneval", 164), ("code_alpaca", 4535)],
)
def test_shipped_sets_load_every_row_in_file_order(name, count):
    conversations = load_benchmark(name)
    assert len(conversations) == count
    assert all(c.benchmark == name for c in conversations)
    assert len({c.id for c in conversations}) == count
    assert all(len(c.turns) == 1 and c.turns[0].strip() for c in conversations)


def test_gsm8k_question_gets_math_suffix_and_final_answer_reference():
    first = load_benchmark("gsm8k")[0]
    assert MATH_SUFFIX == "\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert first.turns[0].startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert first.turns[0].endswith("at the farmers' market?" + MATH_SUFFIX)
    assert first.reference == "18"


def test_gsm8k_train_is_a_different_file_from_test():
    assert load_benchmark("gsm8k_train")[0].turns[0].startswith("Natalia sold clips")


def test_humaneval_asks_to_complete_the_stub_in_a_code_block():
    raw = json.loads((default_data_dir() / "humaneval.jsonl").read_text().split("\n")[0])
    first = load_benchmark("humaneval")[0]
    assert first.id == "HumanEval/0"
    assert first.turns[0].startswith("Complete the following Python function")
    assert f"```python\n{raw['prompt'].rstrip()}\n```" in first.turns[0]
    assert first.reference == raw["canonical_solution"]


def test_mbpp_splits_follow_task_id_ranges():
    raw = json.loads((default_data_dir() / "mbpp_sanitized.json").read_text())
    assert len(raw) == 427
    for split, task_ids in MBPP_SPLITS.items():
        expected = [str(row["task_id"]) for row in raw if row["task_id"] in task_ids]
        loaded = load_benchmark("mbpp", split=split)
        assert [c.id for c in loaded] == expected
        assert all(int(c.id) in task_ids for c in loaded)
    assert len(load_benchmark("mbpp")) == len(load_benchmark("mbpp", split="test")) == 257


def test_mbpp_prompt_carries_task_and_assertions():
    raw = next(r for r in json.loads((default_data_dir() / "mbpp_sanitized.json").read_text()) if r["task_id"] == 11)
    first = load_benchmark("mbpp")[0]
    tests = "\n".join(raw["test_list"])
    assert first.turns == [f"{raw['prompt']}\nYour code should pass these tests:\n{tests}"]
    assert first.reference == raw["code"]


def test_code_alpaca_appends_input_only_when_present():
    raw = json.loads((default_data_dir() / "code_alpaca.json").read_text())
    loaded = load_benchmark("code_alpaca")
    with_input = next(i for i, r in enumerate(raw) if r["input"].strip())
    without_input = next(i for i, r in enumerate(raw) if not r["input"].strip())
    assert loaded[with_input].turns == [f"{raw[with_input]['instruction']}\n\n{raw[with_input]['input']}"]
    assert loaded[without_input].turns == [raw[without_input]["instruction"]]
    assert loaded[with_input].reference == raw[with_input]["output"]


# --- public formats of the unshipped sets --------------------------------------------------------


def test_math500_fixture():
    loaded = load_benchmark("math500", FIXTURES / "math500.jsonl")
    assert [c.id for c in loaded] == [
        "test/number_theory/1001.json",
        "test/counting_and_probability/117.json",
        "test/algebra/2050.json",
    ]
    assert loaded[1].turns == ["Compute $\\dbinom{10}{4}$." + MATH_SUFFIX]
    assert loaded[1].category == "Counting & Probability"
    assert loaded[1].reference == "210"


def test_aime_jsonl_and_capitalised_json_list():
    lower = load_benchmark("aime", FIXTURES / "aime.jsonl")
    assert [c.id for c in lower] == ["60", "61"]
    assert lower[0].turns[0].startswith("Find the number of positive integers less than $1000$")
    assert lower[0].turns[0].endswith(MATH_SUFFIX)
    assert lower[1].reference == "370"

    capitalised = load_benchmark("aime", str(FIXTURES / "aime_capitalised.json"))
    assert [c.id for c in capitalised] == ["2024-I-1", "2024-I-2", "2024-I-3"]
    assert capitalised[0].turns[0].startswith("A rectangle has perimeter $40$")
    assert capitalised[0].turns[0].endswith(MATH_SUFFIX)
    assert capitalised[0].reference == "208"  # an integer Answer becomes text


def test_mt_bench_keeps_every_turn():
    loaded = load_benchmark("mt_bench", FIXTURES / "mt_bench_question.jsonl")
    assert [c.id for c in loaded] == ["81", "111", "131"]
    assert [c.category for c in loaded] == ["writing", "math", "extraction"]
    assert all(len(c.turns) == 2 for c in loaded)
    assert loaded[1].turns[1] == "What's area of the circle circumscribing the triangle?"
    assert not any(turn.endswith(MATH_SUFFIX) for c in loaded for turn in c.turns)


def test_swe_lite_gives_repo_and_issue_and_asks_for_a_patch():
    loaded = load_benchmark("swe_lite", FIXTURES / "swe_lite.jsonl")
    assert [c.id for c in loaded] == ["psf__requests-9999", "pallets__flask-9998"]
    first = loaded[0]
    assert first.category == "psf/requests"
    assert "Repository: psf/requests" in first.turns[0]
    assert "sends the literal string \"b'GET'\"" in first.turns[0]
    assert "patch" in first.turns[0]
    assert first.reference.startswith("diff --git a/requests/sessions.py")


def test_json_list_and_jsonl_give_the_same_conversations(tmp_path):
    rows = [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}, {"question": "Is 7 prime?"}]
    as_list = tmp_path / "named_like_lines.jsonl"
    as_list.write_text("  \n" + json.dumps(rows, indent=2))
    as_lines = write_jsonl(tmp_path / "named_like_list.json", rows)
    assert (
        load_benchmark("gsm8k", as_list)
        == load_benchmark("gsm8k", as_lines)
        == [
            Conversation("0", "gsm8k", ["What is 2 + 3?" + MATH_SUFFIX], reference="5"),
            Conversation("1", "gsm8k", ["Is 7 prime?" + MATH_SUFFIX]),
        ]
    )


def test_num_prompts_takes_the_first_n():
    everything = load_benchmark("humaneval")
    assert load_benchmark("humaneval", num_prompts=5) == everything[:5]
    assert load_benchmark("humaneval", num_prompts=0) == []
    assert len(load_benchmark("humaneval", num_prompts=1000)) == 164
    assert [c.id for c in load_benchmark("mbpp", num_prompts=2, split="train")] == [
        c.id for c in load_benchmark("mbpp", split="train")[:2]
    ]


def test_data_dir_override_by_environment(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "gsm8k_test.jsonl", [{"question": "Only one?", "answer": "#### 1"}])
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert [c.turns[0] for c in load_benchmark("gsm8k")] == ["Only one?" + MATH_SUFFIX]


def test_benchmarks_are_the_papers_sets_in_order_and_all_loadable():
    assert BENCHMARKS == ("gsm8k", "math500", "aime", "mbpp", "humaneval", "swe_lite", "mt_bench")
    fixture = {
        "math500": "math500.jsonl",
        "aime": "aime.jsonl",
        "swe_lite": "swe_lite.jsonl",
        "mt_bench": "mt_bench_question.jsonl",
    }
    for name in BENCHMARKS:
        path = FIXTURES / fixture[name] if name in fixture else None
        assert load_benchmark(name, path, num_prompts=1)[0].benchmark == name


# --- any prompt file ----------------------------------------------------------------------------


def test_load_prompt_file_reads_every_row_shape():
    loaded = load_prompt_file(FIXTURES / "custom_prompts.jsonl")
    assert [c.turns for c in loaded] == [
        ["Say hello in French."],
        ["What is the capital of Peru?"],
        ["Prove that the square root of 2 is irrational."],
        ["Translate to German.\n\nGood morning"],
        ["Name a prime number.", "Now name a larger one."],
        ["Define entropy.", "In one word?"],
    ]
    assert [c.id for c in loaded] == ["greet", "1", "2", "3", "4", "5"]
    assert {c.benchmark for c in loaded} == {"custom_prompts"}
    assert loaded[4].category == "chat"


def test_load_prompt_file_rejects_rows_without_a_prompt(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"text": "no known field"}])
    with pytest.raises(PromptFormatError, match=r"p\.jsonl, line 2: missing field 'prompt'.*'messages'"):
        load_prompt_file(path)


def test_load_prompt_file_rejects_messages_without_user_turns(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "system", "content": "Be brief."}]}])
    with pytest.raises(PromptFormatError, match=r"line 1: field 'messages' should hold at least one user"):
        load_prompt_file(path)


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["math500", "aime", "swe_lite", "mt_bench"])
def test_unshipped_set_without_path_says_how_to_fix(name):
    with pytest.raises(FileNotFoundError) as caught:
        load_benchmark(name)
    assert isinstance(caught.value, PromptFileNotFoundError)
    assert re.search(rf"no prompt file ships for benchmark '{name}'; set data\.{name}=PATH to a ", str(caught.value))


def test_missing_file_names_the_path_and_the_fix(tmp_path):
    missing = tmp_path / "nowhere" / "aime24.jsonl"
    with pytest.raises(PromptFileNotFoundError, match=re.escape(f"not found: {missing}; set data.aime=PATH")):
        load_benchmark("aime", missing)


def test_missing_shipped_file_also_points_at_the_data_env(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    expected = f"not found: {tmp_path / 'humaneval.jsonl'}; set data.humaneval=PATH"
    with pytest.raises(PromptFileNotFoundError, match=re.escape(expected) + f".*{DATA_ENV}"):
        load_benchmark("humaneval")


@pytest.mark.parametrize("content", ["", "  \n\n", "[]"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*empty"):
        load_benchmark("gsm8k", path)


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "fine"}\n\n{"question": "cut off\n')
    with pytest.raises(PromptFormatError, match=re.escape(f"{path}, line 3: malformed JSON")):
        load_benchmark("gsm8k", path)


def test_malformed_json_list_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"question": "fine"},\n  {"question": }\n]\n')
    with pytest.raises(PromptFormatError, match=re.escape(f"{path}, line 3: malformed JSON")):
        load_benchmark("gsm8k", path)


def test_missing_field_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "aime.jsonl", [{"id": 1, "problem": "Fine."}, {"id": 2, "answer": "7"}])
    with pytest.raises(PromptFormatError, match=re.escape(f"{path}, line 2: missing field 'problem'")):
        load_benchmark("aime", path)


def test_missing_field_in_json_list_names_the_row(tmp_path):
    path = tmp_path / "mt.json"
    path.write_text(json.dumps([{"question_id": 1, "turns": ["hi"]}, {"question_id": 2}]))
    with pytest.raises(PromptFormatError, match=re.escape(f"{path}, row 2: missing field 'turns'")):
        load_benchmark("mt_bench", path)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"question_id": 1, "turns": "one string"}, "field 'turns' should be a non-empty list of strings"),
        ({"question_id": 1, "turns": []}, "field 'turns' should be a non-empty list of strings"),
        ({"question_id": {"n": 1}, "turns": ["hi"]}, "field 'question_id' should be text, got dict"),
    ],
)
def test_wrongly_typed_fields(tmp_path, row, message):
    path = write_jsonl(tmp_path / "q.jsonl", [row])
    with pytest.raises(PromptFormatError, match=re.escape(f"line 1: {message}")):
        load_benchmark("mt_bench", path)


def test_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[{"question": "fine"}, "just a string"]')
    with pytest.raises(PromptFormatError, match=re.escape(f"{path}, row 2: expected a JSON object, got str")):
        load_benchmark("gsm8k", path)


def test_unknown_benchmark_lists_names_and_suggests_one():
    with pytest.raises(KeyError) as caught:
        load_benchmark("gsm8")
    assert isinstance(caught.value, UnknownBenchmarkError)
    message = str(caught.value)
    assert message.startswith("unknown benchmark 'gsm8' (did you mean 'gsm8k'?); known benchmarks: ")
    assert all(name in message for name in BENCHMARKS)


def test_unknown_benchmark_without_a_close_name():
    with pytest.raises(UnknownBenchmarkError, match=r"^unknown benchmark 'zzz'; known benchmarks: aime, "):
        load_benchmark("zzz")


def test_unknown_mbpp_split():
    with pytest.raises(ValueError, match="unknown MBPP split 'dev'; known splits: test, validation, train"):
        load_benchmark("mbpp", split="dev")


def test_negative_num_prompts():
    with pytest.raises(ValueError, match="num_prompts must be >= 0"):
        load_benchmark("gsm8k", num_prompts=-1)
