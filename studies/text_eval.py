"""Held-out tau of many drafts on the same benchmark prompts, scored on the target's own text.

The reference texts (the target's response to each prompt's first turn, with its features) are decoded once,
batched, and cached in a file. At eval.temperature = 0 they are its greedy texts and each draft costs drafter
passes only (`speculative.text_tau`); at T > 0 they are its samples at eval.seeds seeds per prompt and each
draft is scored by the sampled-text scorer (`speculative.sampled_tau`: drafter passes and two target passes per
text). A study scores every checkpoint of every arm this way; `draft-opd eval` measures speed and losslessness.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from draft_opd.actors.requests import Request, decode_requests
from draft_opd.launch.config import Config
from draft_opd.launch.run_dir import RunDir
from draft_opd.prompts.sets import load_benchmark
from draft_opd.speculative.decode import DecodeConfig
from draft_opd.speculative.drafter import Drafter
from draft_opd.speculative.loading import make_drafter
from draft_opd.speculative.sampled_tau import sample_blocks_on_text
from draft_opd.speculative.target import Target, load_target
from draft_opd.speculative.tau import tau_mean, tau_pooled
from draft_opd.speculative.text_tau import greedy_walk


@dataclass
class Reference:
    tokens: list[int]  # prompt + the target's greedy (or, at T > 0, sampled) response
    prompt_len: int
    features: torch.Tensor  # [len(tokens), F], the target's
    seed: int = 0  # the sampling seed of the text at T > 0; the scorer's draft samples use it too


def reference_texts(
    cfg: Config, target: Target, benchmark: str, prompts: int, max_new_tokens: int, path: Path, batch_size: int = 16
) -> list[Reference]:
    """The target's responses to the first `prompts` prompts of `benchmark` at eval.temperature (at T > 0 one per
    sampling seed 0 .. eval.seeds - 1), cached at `path`."""
    if path.exists():
        return [Reference(**r) for r in torch.load(path, weights_only=False)]
    convs = load_benchmark(benchmark, cfg.data.get(benchmark), prompts)
    seeds = range(cfg.eval.seeds)
    requests = [(s, Request.of(target.tokenizer, s, conv, cfg.target.thinking)) for s in seeds for conv in convs]
    decode = DecodeConfig(max_new_tokens=max_new_tokens, temperature=cfg.eval.temperature, keep_features=True)
    order = {id(r): i for i, (_, r) in enumerate(requests)}
    seed_of = {id(r): s for s, r in requests}
    rows = decode_requests(target, None, decode, batch_size, [r for _, r in requests])
    done = sorted(rows, key=lambda rr: order[id(rr[0])])
    refs = [Reference(r.tokens, r.prompt_len, r.features, seed_of[id(q)]) for q, r in done]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save([vars(r) for r in refs], path)
    return refs


def text_tau(drafter: Drafter, refs: list[Reference], max_new_tokens: int, stop_ids: list[int]) -> dict:
    """tau_mean and tau_pooled (`speculative.tau`) of `drafter` over the greedy reference texts."""
    walks = [greedy_walk(drafter, r.features, r.tokens, r.prompt_len, max_new_tokens, stop_ids) for r in refs]
    lens = [walk.accept_lens for walk in walks]
    return {"tau_mean": tau_mean(lens), "tau_pooled": tau_pooled(lens), "prompts": len(refs)}


def sampled_tau(
    target: Target,
    drafter: Drafter,
    refs: list[Reference],
    max_new_tokens: int,
    stop_ids: list[int],
    temperature: float,
) -> dict:
    """The sampled-text scorer's tau over target-sampled reference texts: tau_mean (mean over texts of committed
    tokens / expected steps) with its 95 % interval over texts, and tau_pooled."""
    steps = []
    for r in refs:
        gen = torch.Generator().manual_seed(r.seed)
        blocks = sample_blocks_on_text(
            target, drafter, r.tokens, r.prompt_len, max_new_tokens, temperature, stop_ids, gen
        )
        steps.append(blocks.steps())
    taus = [tokens / expected for tokens, expected in steps if expected > 0]
    return {
        "tau_mean": statistics.fmean(taus),
        "tau_ci95": 1.96 * statistics.stdev(taus) / len(taus) ** 0.5 if len(taus) > 1 else None,
        "tau_pooled": sum(t for t, _ in steps) / sum(e for _, e in steps),
        "prompts": len(refs),
    }


def checkpoint_states(run: Path, step: int) -> Path:
    """The drafter weights in a run's DeepSpeed checkpoint at `step`."""
    states = RunDir(run).checkpoint(step) / "learner" / "mp_rank_00_model_states.pt"
    if not states.exists():
        raise SystemExit(f"no checkpoint at {states}: the run has not reached step {step} or did not keep it")
    return states


@dataclass
class TextScorer:
    """Text-walked tau of drafts on `prompts` x `max_new_tokens` references per benchmark, cached in `cache_dir`;
    `load(*overrides)` gives the config (its target, fp32 for evaluation; its draft settings). The target and
    the reference texts load on first use."""

    load: Callable[..., Config]
    cache_dir: Path
    prompts: int
    max_new_tokens: int
    target: Target | None = None
    refs: dict[str, list[Reference]] = field(default_factory=dict)

    def drafter(self, draft: Path | None = None, states: Path | None = None) -> Drafter:
        """A draft directory's drafter, or one holding a DeepSpeed checkpoint's weights (`states`)."""
        cfg = self.load(f"draft={draft}" if draft else "draft.init=random")
        self.target = self.target or load_target(cfg.target)
        drafter = make_drafter(cfg.draft, self.target)
        if states is not None:
            weights = torch.load(states, weights_only=False)["module"]
            drafter.load_state_dict({k: v.to(next(drafter.parameters()).dtype) for k, v in weights.items()})
        return drafter

    def __call__(self, drafter: Drafter, benchmarks: tuple[str, ...]) -> dict[str, dict]:
        cfg = self.load()
        sampled = cfg.eval.temperature > 0
        for b in benchmarks:
            if b not in self.refs:
                kind = f"-T{cfg.eval.temperature:g}x{cfg.eval.seeds}" if sampled else ""
                path = self.cache_dir / f"reference-{b}-{self.prompts}x{self.max_new_tokens}{kind}.pt"
                self.refs[b] = reference_texts(cfg, self.target, b, self.prompts, self.max_new_tokens, path)
        stops, n = self.target.stop_token_ids(), self.max_new_tokens
        if sampled:
            return {
                b: sampled_tau(self.target, drafter, self.refs[b], n, stops, cfg.eval.temperature) for b in benchmarks
            }
        return {b: text_tau(drafter, self.refs[b], n, stops) for b in benchmarks}
