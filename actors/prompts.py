"""The prompt stream of the rollout actors: deterministic, sharded across actors, endless by epochs."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from draft_opd.prompts.sets import Conversation, benchmark_names, load_benchmark, load_prompt_file


def load_prompts(source: str, num_prompts: int | None = None, key: str = "rollout.prompts") -> list[Conversation]:
    """A benchmark name (gsm8k_train, code_alpaca, ...) or any JSON/JSONL prompt file; errors name `key`."""
    if source in benchmark_names():
        conversations = load_benchmark(source, num_prompts=num_prompts)
    elif Path(source).suffix in (".json", ".jsonl"):
        conversations = load_prompt_file(source)[:num_prompts]
    else:
        close = difflib.get_close_matches(source, benchmark_names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"{key}={source!r} is neither a benchmark{hint} ({', '.join(benchmark_names())}) "
            "nor a .json/.jsonl prompt file"
        )
    if not conversations:
        raise ValueError(f"{key}={source!r} holds no prompts")
    return conversations


@dataclass
class PromptPool:
    """Actor `shard` of `num_shards` takes prompts shard, shard + num_shards, ... and cycles epochs.

    `position` counts the prompts this shard has taken, so a checkpoint can resume the stream
    without repeating or skipping one.
    """

    conversations: list[Conversation]
    shard: int = 0
    num_shards: int = 1
    position: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.shard < self.num_shards:
            raise ValueError(f"shard {self.shard} out of range for {self.num_shards} shards")
        self.indices = list(range(self.shard, len(self.conversations), self.num_shards))
        if not self.indices:
            raise ValueError(
                f"{len(self.conversations)} prompts cannot feed {self.num_shards} actors; "
                "lower rollout.num_actors or add prompts"
            )

    def at(self, position: int) -> tuple[int, Conversation]:
        """(epoch, conversation) of the prompt at `position` of this shard's stream."""
        epoch, i = divmod(position, len(self.indices))
        return epoch, self.conversations[self.indices[i]]

    def peek(self) -> tuple[int, Conversation]:
        """(epoch, conversation) of the next prompt, without taking it."""
        return self.at(self.position)

    def next(self) -> tuple[int, Conversation]:
        """(epoch, conversation) of the next prompt."""
        taken = self.peek()
        self.position += 1
        return taken
