"""A prompt ready to roll out, and decoding a stream of them: what rollouts and `draft-opd generate` share."""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from draft_opd.prompts.chat import render_first_turn
from draft_opd.speculative.batch_decode import generate_batch
from draft_opd.speculative.decode import ContextTooLongError, DecodeConfig, DecodeResult, check_context


def trajectory_id(epoch: int, conv) -> str:
    """A prompt's trajectory in one epoch of the stream: the idempotency key of buffer inserts."""
    return f"{conv.benchmark}/{conv.id}@{epoch}"


@dataclass(frozen=True)
class Request:
    """A prompt ready to decode: its trajectory id, prompt id, rendered tokens (first user turn) and seed."""

    traj_id: str
    prompt_id: str
    prompt: list[int]
    seed: int  # from the trajectory id: a retried or resumed prompt samples the same tokens

    @classmethod
    def of(cls, tokenizer, epoch: int, conv, thinking: bool) -> Request:
        traj_id = trajectory_id(epoch, conv)
        prompt = render_first_turn(tokenizer, conv.turns[0], thinking)
        return cls(traj_id, f"{conv.benchmark}/{conv.id}", prompt, zlib.crc32(traj_id.encode()))


def fits_context(target, request: Request, max_new_tokens: int, block_size: int, who: str, key: str) -> bool:
    """Whether prompt + `max_new_tokens` fit the target's context; if not, a warning names the prompt and `key`,
    the setting that would keep it: a long prompt is skipped, it does not stop a job."""
    try:
        check_context(target, len(request.prompt), max_new_tokens, block_size)
    except ContextTooLongError as err:
        warnings.warn(f"{who}: skipped prompt {request.traj_id}: {err.problem}; to keep it, lower {key}", stacklevel=3)
        return False
    return True


def decode_requests(
    target, drafter, decode: DecodeConfig, batch_size: int, requests: Iterable[Request]
) -> Iterator[tuple[Request, DecodeResult]]:
    """(request, result) in the order rows finish, `batch_size` rows per target pass (`generate_batch`);
    requests are read lazily, one whenever a row is free."""
    taken: list[Request] = []

    def prompts() -> Iterator[tuple[list[int], int]]:
        for request in requests:
            taken.append(request)
            yield request.prompt, request.seed

    for index, result in generate_batch(target, prompts(), drafter, decode, batch_size):
        yield taken[index], result
