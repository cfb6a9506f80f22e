"""Where a parallel rollout's greedy text comes from: the target's T = 0 response to a prompt, made once.

A parallel rollout (`speculative.parallel_rollout`) needs only the target's greedy text of a prompt, which no
draft changes. So it is made once per prompt and kept for every epoch and draft version. `GreedyText` is the
interface: anything that maps prompts to the target's greedy texts at the rollout's dtype serves, e.g. a stock
engine's offline generation at temperature 0 on a GPU cluster. Two sources ship:

- `DecodedText`: batched plain decoding by the rollout's own target (the path of `draft-opd generate`), so the
  dtype that makes the text is the one that scores it;
- `CorpusText`: the texts of a `draft-opd generate` corpus, for the prompts it holds, else another source.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from draft_opd.actors.requests import Request, decode_requests
from draft_opd.buffer import CORPUS_CAPACITY, BufferConfig, ReplayBuffer
from draft_opd.speculative.decode import DecodeConfig
from draft_opd.speculative.target import Target


class GreedyText(Protocol):
    def texts(self, requests: Iterable[Request]) -> Iterator[tuple[Request, list[int]]]:
        """(request, prompt + the target's greedy response) for each request, in any order."""
        ...


class DecodedText:
    """Greedy texts by plain decoding with `target`, `batch_size` prompts per pass, each prompt decoded once."""

    def __init__(self, target: Target, decode: DecodeConfig, batch_size: int):
        self.target, self.batch_size = target, batch_size
        self.decode = replace(decode, temperature=0.0, block_size=1, topk_logprobs=0, keep_features=False)
        self.known: dict[str, list[int]] = {}

    def texts(self, requests: Iterable[Request]) -> Iterator[tuple[Request, list[int]]]:
        todo = []
        for request in requests:
            if request.prompt_id in self.known:
                yield request, self.known[request.prompt_id]
            else:
                todo.append(request)
        if not todo:
            return
        for request, result in decode_requests(self.target, None, self.decode, self.batch_size, todo):
            self.known[request.prompt_id] = result.tokens
            yield request, result.tokens


class CorpusText:
    """The texts of a `draft-opd generate` corpus (made with the rollout's target and dtype) for the prompts it
    holds with the same rendering and enough new tokens; the others come from `fallback`."""

    def __init__(self, corpus: str | Path, max_new_tokens: int, stop_ids: list[int], fallback: GreedyText):
        self.fallback, self.stops = fallback, set(stop_ids)
        with ReplayBuffer(BufferConfig(dir=str(corpus), capacity=CORPUS_CAPACITY, samples_per_insert=None)) as buffer:
            rows = [buffer.get(t) for t in buffer.traj_ids()]
        self.known = {
            row.prompt_id: (list(row.input_ids), row.prompt_len)
            for row in rows
            if len(row.input_ids) - row.prompt_len >= max_new_tokens or row.input_ids[-1] in self.stops
        }

    def texts(self, requests: Iterable[Request]) -> Iterator[tuple[Request, list[int]]]:
        missing = []
        for request in requests:
            tokens, prompt_len = self.known.get(request.prompt_id, ([], 0))
            if tokens[:prompt_len] == request.prompt and prompt_len:
                yield request, tokens
            else:
                missing.append(request)
        yield from self.fallback.texts(missing)
