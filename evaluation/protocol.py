"""The tau / speedup protocol of the anchors (dflash `benchmark.py`), on our decode loop.

Batch 1. Each turn is decoded twice through the same loop: block size 1 (plain autoregressive,
the baseline) and the drafter's block. Speedup = mean TPOT(plain) / mean TPOT(spec), with time
per output token excluding prefill. tau is reported two ways: the mean over turns of each
turn's mean (DFlash) and total committed tokens / total verify steps (SpecForge). MT-Bench
turns build on the earlier turns and the target's own answers. At T > 0 each conversation is decoded at
several sampling seeds, and tau_mean carries a 95 % interval over turns and seeds.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from draft_opd.prompts.chat import render_first_turn, render_prompt
from draft_opd.prompts.sets import Conversation
from draft_opd.speculative.decode import (
    ContextTooLongError,
    DecodeConfig,
    DecodeResult,
    block_size_of,
    check_context,
    generate,
)
from draft_opd.speculative.drafter import Drafter
from draft_opd.speculative.target import Target
from draft_opd.speculative.tau import tau_interval, tau_mean, tau_pooled


@dataclass
class TurnResult:
    conversation: str
    turn: int
    seed: int
    prompt_tokens: int
    new_tokens: int
    lossless: bool
    tpot_plain: float
    tpot_spec: float | None
    taus: list[int] = field(default_factory=list)  # per verify step

    @property
    def accept_lens(self) -> list[int]:
        return [tau - 1 for tau in self.taus]


@dataclass
class BenchmarkSummary:
    benchmark: str
    prompts: int
    turns: int
    new_tokens: int
    tau_mean: float | None
    tau_pooled: float | None
    tau_ci95: float | None  # half width of tau_mean's 95 % interval over turns (and sampling seeds)
    speedup: float | None
    tokens_per_s_spec: float | None
    tokens_per_s_plain: float
    lossless: bool | None

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(benchmark: str, prompts: int, turns: list[TurnResult]) -> BenchmarkSummary:
    spec = [t for t in turns if t.tpot_spec is not None]
    accept_lens = [t.accept_lens for t in spec]
    plain_tpot = statistics.fmean(t.tpot_plain for t in turns) if turns else float("nan")
    spec_tpot = statistics.fmean(t.tpot_spec for t in spec) if spec else None
    return BenchmarkSummary(
        benchmark=benchmark,
        prompts=prompts,
        turns=len(turns),
        new_tokens=sum(t.new_tokens for t in turns),
        tau_mean=tau_mean(accept_lens),
        tau_pooled=tau_pooled(accept_lens),
        tau_ci95=tau_interval(accept_lens),
        speedup=plain_tpot / spec_tpot if spec_tpot else None,
        tokens_per_s_spec=1.0 / spec_tpot if spec_tpot else None,
        tokens_per_s_plain=1.0 / plain_tpot if turns else float("nan"),
        lossless=all(t.lossless for t in spec) if spec else None,
    )


def decode_turn(
    target: Target, drafter: Drafter | None, prompt: list[int], cfg: DecodeConfig
) -> tuple[DecodeResult, DecodeResult | None]:
    plain = generate(target, prompt, None, cfg)
    spec = generate(target, prompt, drafter, cfg) if drafter is not None else None
    return plain, spec


def check_turn_fits(
    target: Target, drafter: Drafter | None, conv: Conversation, turn: int, prompt: list[int], cfg: DecodeConfig
) -> None:
    """A turn too long for the target's context is an error naming the prompt: skipping it or cutting its
    output short would silently change what the benchmark measures."""
    try:
        check_context(target, len(prompt), cfg.max_new_tokens, block_size_of(drafter, cfg))
    except ContextTooLongError as err:
        raise ContextTooLongError(
            f"{conv.benchmark}/{conv.id}, turn {turn + 1}: {err.problem}",
            f"lower eval.max_new_tokens, or leave this prompt out (data.{conv.benchmark}=PATH to a copy without it)",
        ) from None


def check_first_turns_fit(
    target: Target, drafter: Drafter | None, conversations: list[Conversation], cfg: DecodeConfig, thinking: bool
) -> None:
    """Fail before any decoding; later turns hold the target's answers, so they are checked as they come."""
    for conv in conversations:
        prompt = render_first_turn(target.tokenizer, conv.turns[0], thinking)
        check_turn_fits(target, drafter, conv, 0, prompt, cfg)


def run_conversation(
    target: Target, drafter: Drafter | None, conv: Conversation, cfg: DecodeConfig, thinking: bool
) -> list[TurnResult]:
    messages: list[dict[str, str]] = []
    results = []
    for i, turn in enumerate(conv.turns):
        messages.append({"role": "user", "content": turn})
        prompt = render_prompt(target.tokenizer, messages, thinking)
        check_turn_fits(target, drafter, conv, i, prompt, cfg)
        plain, spec = decode_turn(target, drafter, prompt, cfg)
        lossless = spec is None or cfg.temperature > 0 or spec.tokens == plain.tokens
        results.append(
            TurnResult(
                conversation=conv.id,
                turn=i,
                seed=cfg.seed,
                prompt_tokens=len(prompt),
                new_tokens=plain.num_new_tokens,
                lossless=lossless,
                tpot_plain=plain.time_per_output_token,
                tpot_spec=spec.time_per_output_token if spec else None,
                taus=[s.tau for s in spec.steps] if spec else [],
            )
        )
        answer = target.tokenizer.decode(plain.response, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": answer})
    return results


def run_benchmark(
    target: Target,
    drafter: Drafter | None,
    name: str,
    conversations: list[Conversation],
    cfg: DecodeConfig,
    thinking: bool,
    on_turn: Callable[[TurnResult], None] | None = None,
    seeds: int = 1,
) -> tuple[BenchmarkSummary, list[TurnResult]]:
    """Every conversation at sampling seeds cfg.seed .. cfg.seed + seeds - 1 (one seed at T = 0: greedy)."""
    turns: list[TurnResult] = []
    for seed in range(cfg.seed, cfg.seed + seeds):
        for conv in conversations:
            for result in run_conversation(target, drafter, conv, replace(cfg, seed=seed), thinking):
                turns.append(result)
                if on_turn:
                    on_turn(result)
    return summarize(name, len(conversations), turns), turns
