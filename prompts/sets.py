"""Benchmark prompt sets, read from local files into `Conversation`s.

Evaluation (tau and speedup) and on-policy training both need the benchmark prompts built the
way the anchors build them (DFlash `benchmark.py`), so that our acceptance lengths compare with
theirs: math questions get the step-by-step/boxed instruction, HumanEval gets its function
stub in a code block, MT-Bench keeps every user turn. Only local files are read, never the
network: the sets whose licences allow it ship in the repository's `data/prompts` (override the
folder with $DRAFT_OPD_DATA); for the others the user points the config at a file in the set's public
format (`data.<name>=PATH`).

Every set accepts both JSON Lines and one JSON list, whatever the file is called. Each loader
is a small function that maps one row to a `Conversation`; reading, field lookup and error
messages are shared, so a bad file always names the file, the line and the field.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
"""Appended to every math question, as in the anchors' evaluation protocol."""

DATA_ENV = "DRAFT_OPD_DATA"
"""Environment variable naming the folder that holds the shipped prompt files."""

BENCHMARKS: tuple[str, ...] = (
    "gsm8k",
    "math500",
    "aime",
    "mbpp",
    "humaneval",
    "swe_lite",
    "mt_bench",
)
"""The evaluation sets, in the order the Draft-OPD paper reports them."""

MBPP_SPLITS: dict[str, range] = {
    "test": range(11, 511),
    "validation": range(511, 601),
    "train": range(601, 975),
}
"""MBPP's official split by task_id; ids 1-10 are the few-shot prompt examples, in no split."""


@dataclass(frozen=True)
class Conversation:
    """One benchmark item: the user turns, fed to the target one after another.

    Multi-turn sets (MT-Bench) have several turns; the assistant replies in between are
    generated at evaluation time, so they are not stored. `reference` is the set's answer
    (final answer, reference code, patch) where it has one, for checking outputs later.
    """

    id: str
    benchmark: str
    turns: list[str]
    category: str = ""
    reference: str | None = None


class PromptFileNotFoundError(FileNotFoundError):
    """No file to read for a benchmark: none ships for it, or the given path does not exist."""


class UnknownBenchmarkError(KeyError):
    """A benchmark name that no loader answers to."""

    def __str__(self) -> str:
        # KeyError quotes its argument as if it were a key; ours is a sentence.
        return str(self.args[0])


class PromptFormatError(ValueError):
    """A prompt file that is empty, not JSON, or has rows without the fields a set needs."""


def default_data_dir() -> Path:
    """The folder of shipped prompt files: $DRAFT_OPD_DATA, else the repository's `data/prompts`.

    Found relative to this package rather than to the working directory, so commands run from
    anywhere (and `ray job submit --working-dir .` uploads the folder with the code).
    """
    override = os.environ.get(DATA_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "data" / "prompts"


# --- reading rows ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    """One JSON object of a prompt file, with where it came from so that errors can say so."""

    data: dict[str, Any]
    where: str  # "<path>, line N" for JSON Lines, "<path>, row N" for a JSON list
    index: int  # 0-based position among the file's rows; the id of sets that have none

    def error(self, problem: str) -> PromptFormatError:
        return PromptFormatError(f"{self.where}: {problem}")

    def get(self, *names: str) -> Any:
        """The value of the first of `names` present and not null, else None.

        Names match case-insensitively after an exact match fails, because copies of the
        same public set spell fields differently (AIME: `problem` / `Problem`, `id` / `ID`).
        """
        for name in names:
            if self.data.get(name) is not None:
                return self.data[name]
            for key, value in self.data.items():
                if key.lower() == name.lower() and value is not None:
                    return value
        return None

    def required(self, *names: str) -> Any:
        """The first of `names` present; a missing field names the file, the line and the field."""
        value = self.get(*names)
        if value is None:
            alternatives = "".join(f" (or {name!r})" for name in names[1:])
            raise self.error(f"missing field {names[0]!r}{alternatives}")
        return value

    def text(self, *names: str) -> str:
        """A required text field (the first of `names` present); numbers are accepted as text."""
        text = self._as_text(names[0], self.required(*names))
        if not text.strip():
            raise self.error(f"field {names[0]!r} is empty")
        return text

    def optional_text(self, *names: str) -> str | None:
        value = self.get(*names)
        return None if value is None else self._as_text(names[0], value)

    def strings(self, name: str) -> list[str]:
        """A required non-empty list of strings, such as MT-Bench turns or MBPP assertions."""
        value = self.required(name)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise self.error(f"field {name!r} should be a non-empty list of strings")
        return list(value)

    def integer(self, name: str) -> int:
        value = self.required(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"field {name!r} should be an integer, got {type(value).__name__}")
        return value

    def _as_text(self, name: str, value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.error(f"field {name!r} should be text, got {type(value).__name__}")
        return str(value)


_FORMAT = "a prompt file holds JSON Lines (one JSON object per line) or one JSON list of objects"
"""What a prompt file must hold: the fix that format errors name."""


def _read_rows(path: Path) -> list[_Row]:
    """All rows of a prompt file, in file order.

    JSON Lines and one JSON list are told apart by content (a list starts with `[`), since
    public copies of these sets come both ways and are not always named by their format.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PromptFormatError(
            f"{path}: not UTF-8 text (byte {err.start} is {err.object[err.start]:#04x}); "
            f"{_FORMAT} (convert Parquet/Arrow/CSV files to JSON Lines first)"
        ) from None
    if not text.strip():
        raise PromptFormatError(f"{path}: file is empty; expected JSON Lines or a JSON list")
    is_list = text.lstrip().startswith("[")
    items = _json_list_items(path, text) if is_list else _json_lines_items(path, text)
    if not items:
        raise PromptFormatError(f"{path}: the JSON list is empty; expected one object per prompt")
    rows = []
    for index, (where, item) in enumerate(items):
        if not isinstance(item, dict):
            raise PromptFormatError(f"{where}: expected a JSON object, got {type(item).__name__}")
        rows.append(_Row(item, where, index))
    return rows


def _json_list_items(path: Path, text: str) -> list[tuple[str, Any]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise PromptFormatError(f"{path}, line {err.lineno}: malformed JSON ({err.msg}); {_FORMAT}") from None
    return [(f"{path}, row {number}", item) for number, item in enumerate(items, start=1)]


def _json_lines_items(path: Path, text: str) -> list[tuple[str, Any]]:
    items = []
    # split("\n"), not splitlines(): that also breaks at U+2028, which JSON strings may hold.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            items.append((f"{path}, line {number}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise PromptFormatError(
                f"{path}, line {number}: malformed JSON ({err.msg}); fix or delete that line ({_FORMAT})"
            ) from None
    return items


# --- one row -> one Conversation, per set -----------------------------------------------------


def _gsm8k(row: _Row, name: str) -> Conversation:
    answer = row.optional_text("answer")
    # GSM8K answers are worked solutions ending in "#### <final answer>"; keep the final answer.
    final = None if answer is None else answer.rsplit("####", 1)[-1].strip()
    return Conversation(str(row.index), name, [row.text("question") + MATH_SUFFIX], reference=final)


def _math500(row: _Row, name: str) -> Conversation:
    return Conversation(
        row.optional_text("unique_id") or str(row.index),
        name,
        [row.text("problem") + MATH_SUFFIX],
        category=row.optional_text("subject") or "",
        reference=row.optional_text("answer"),
    )


def _aime(row: _Row, name: str) -> Conversation:
    return Conversation(
        row.optional_text("id") or str(row.index),
        name,
        [row.text("problem", "question") + MATH_SUFFIX],
        reference=row.optional_text("answer"),
    )


def _mbpp(row: _Row, name: str, split: str = "test") -> Conversation | None:
    """An MBPP task in the requested split (None outside it), with its assertions in the prompt."""
    task_id = row.integer("task_id")
    if task_id not in _mbpp_split(split):
        return None
    # The sanitized release calls the task text "prompt", the full release "text".
    task = row.text("prompt", "text")
    tests = "\n".join(row.strings("test_list"))
    return Conversation(
        str(task_id),
        name,
        [f"{task}\nYour code should pass these tests:\n{tests}"],
        reference=row.optional_text("code"),
    )


def _mbpp_split(split: str) -> range:
    try:
        return MBPP_SPLITS[split]
    except KeyError:
        known = ", ".join(MBPP_SPLITS)
        raise ValueError(f"unknown MBPP split {split!r}; known splits: {known}") from None


def _humaneval(row: _Row, name: str) -> Conversation:
    stub = row.text("prompt").rstrip("\n")
    request = f"Complete the following Python function so that it passes its tests:\n```python\n{stub}\n```"
    return Conversation(row.text("task_id"), name, [request], reference=row.optional_text("canonical_solution"))


def _swe_lite(row: _Row, name: str) -> Conversation:
    repo = row.text("repo")
    request = (
        f"Repository: {repo}\n\nIssue:\n{row.text('problem_statement')}\n\n"
        "Write a patch, as a unified diff against the repository, that resolves this issue."
    )
    patch = row.optional_text("patch")
    return Conversation(row.text("instance_id"), name, [request], category=repo, reference=patch)


def _mt_bench(row: _Row, name: str) -> Conversation:
    category = row.optional_text("category") or ""
    return Conversation(row.text("question_id"), name, row.strings("turns"), category=category)


def _code_alpaca(row: _Row, name: str) -> Conversation:
    return Conversation(str(row.index), name, [_instruction_prompt(row)], reference=row.optional_text("output"))


def _instruction_prompt(row: _Row) -> str:
    """Alpaca-style instruction, followed by its input when it has one."""
    instruction = row.text("instruction")
    extra = row.optional_text("input")
    return f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction


# --- the registry -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Loader:
    convert: Callable[..., Conversation | None]  # (row, name, **options); None drops the row
    default_file: str | None  # in default_data_dir(); None where no file ships
    holds: str  # what a file for this set holds, for the fix in error messages


_LOADERS: dict[str, _Loader] = {
    "gsm8k": _Loader(_gsm8k, "gsm8k_test.jsonl", "GSM8K problems (question, answer)"),
    "gsm8k_train": _Loader(_gsm8k, "gsm8k_train.jsonl", "GSM8K problems (question, answer)"),
    "math500": _Loader(_math500, None, "MATH-500 problems (problem, solution, answer, subject, level, unique_id)"),
    "aime": _Loader(_aime, None, "AIME problems (id, problem, answer, solution)"),
    "mbpp": _Loader(_mbpp, "mbpp_sanitized.json", "MBPP tasks (task_id, prompt, code, test_list)"),
    "humaneval": _Loader(_humaneval, "humaneval.jsonl", "HumanEval tasks (task_id, prompt, canonical_solution, ...)"),
    "swe_lite": _Loader(_swe_lite, None, "SWE-bench Lite instances (instance_id, repo, problem_statement, ...)"),
    "mt_bench": _Loader(_mt_bench, None, "MT-Bench questions like FastChat's (question_id, category, turns)"),
    "code_alpaca": _Loader(_code_alpaca, "code_alpaca.json", "CodeAlpaca examples (instruction, input, output)"),
}


def load_benchmark(
    name: str,
    path: str | os.PathLike[str] | None = None,
    num_prompts: int | None = None,
    **options: Any,
) -> list[Conversation]:
    """The prompts of benchmark `name` in file order, the first `num_prompts` of them if given.

    `path=None` reads the shipped file. `options` go to the set's loader; only MBPP takes one,
    `split` ("test", "validation" or "train"; default "test").
    """
    if num_prompts is not None and num_prompts < 0:
        raise ValueError(f"num_prompts must be >= 0, got {num_prompts}")
    loader = _loader(name)
    fix = f"set data.{name}=PATH to a JSONL or JSON-list file of {loader.holds}"
    if path is None and loader.default_file is None:
        raise PromptFileNotFoundError(f"no prompt file ships for benchmark {name!r}; {fix}")
    if path is None:
        fix += f", or set {DATA_ENV} to the folder of the shipped prompt files"
        path = default_data_dir() / loader.default_file
    rows = _read_rows(_existing_file(Path(path), fix))
    conversations = [c for row in rows if (c := loader.convert(row, name, **options)) is not None]
    return conversations[:num_prompts]


def load_prompt_file(path: str | os.PathLike[str]) -> list[Conversation]:
    """Prompts from any JSONL/JSON file, for custom sets that follow no benchmark's format.

    Each row needs one of: `turns` (list of user messages), `messages` (OpenAI-style
    {role, content} list; the user contents become the turns), `instruction` (with optional
    `input`), or `prompt` / `question` / `problem`. The benchmark name is the file's stem.
    """
    file = Path(path)
    rows = _read_rows(_existing_file(file, "check the path"))
    return [
        Conversation(
            row.optional_text("id") or str(row.index),
            file.stem,
            _user_turns(row),
            category=row.optional_text("category") or "",
        )
        for row in rows
    ]


def _user_turns(row: _Row) -> list[str]:
    if row.get("turns") is not None:
        return row.strings("turns")
    if row.get("messages") is not None:
        return _user_messages(row)
    if row.get("instruction") is not None:
        return [_instruction_prompt(row)]
    if row.get("prompt", "question", "problem") is not None:
        return [row.text("prompt", "question", "problem")]
    raise row.error(
        "missing field 'prompt': a prompt file row needs one of "
        "'prompt', 'question', 'problem', 'instruction', 'turns' or 'messages'"
    )


def _user_messages(row: _Row) -> list[str]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise row.error("field 'messages' should be a list of {role, content} objects")
    turns = [m.get("content") for m in messages if m.get("role") == "user"]
    if not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise row.error("field 'messages' should hold at least one user message with text content")
    return turns


def benchmark_names() -> list[str]:
    """Every name `load_benchmark` answers to: the evaluation sets and the training prompt sets."""
    return sorted(_LOADERS)


def _loader(name: str) -> _Loader:
    if name in _LOADERS:
        return _LOADERS[name]
    known = sorted(_LOADERS)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UnknownBenchmarkError(f"unknown benchmark {name!r}{hint}; known benchmarks: {', '.join(known)}")


def _existing_file(path: Path, fix: str) -> Path:
    if not path.is_file():
        raise PromptFileNotFoundError(f"prompt file not found: {path}; {fix}")
    return path
