"""Held-out tau of many drafts on the same benchmark prompts, walked on the target's greedy text.

The reference texts (the target's T = 0 response to each prompt's first turn, with its features) are decoded
once, batched, and cached in a file; each draft then costs drafter passes only (`speculative.text_tau`).
A study scores every checkpoint of every arm this way; `draft-opd eval` measures speed and losslessness.
"""

from __future__ import annotations

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
from draft_opd.speculative.target import Target, load_target
from draft_opd.speculative.tau import tau_mean, tau_pooled
from draft_opd.speculative.text_tau import greedy_walk


@dataclass
class Reference:
    tokens: list[int]  # prompt + the target's greedy response
    prompt_len: int
    features: torch.Tensor  # [len(tokens), F], the target's


def reference_texts(
    cfg: Config, target: Target, benchmark: str, prompts: int, max_new_tokens: int, path: Path, batch_size: int = 16
) -> list[Reference]:
    """The target's greedy responses to the first `prompts` prompts of `benchmark`, cached at `path`."""
    if path.exists():
        return [Reference(**r) for r in torch.load(path, weights_only=False)]
    if cfg.eval.temperature > 0:
        raise ValueError("tau on the target's text needs greedy decoding: set eval.temperature=0")
    convs = load_benchmark(benchmark, cfg.data.get(benchmark), prompts)
    requests = [Request.of(target.tokenizer, 0, conv, cfg.target.thinking) for conv in convs]
    decode = DecodeConfig(max_new_tokens=max_new_tokens, keep_features=True)
    order = {id(r): i for i, r in enumerate(requests)}
    done = sorted(decode_requests(target, None, decode, batch_size, requests), key=lambda rr: order[id(rr[0])])
    refs = [Reference(r.tokens, r.prompt_len, r.features) for _, r in done]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save([vars(r) for r in refs], path)
    return refs


def text_tau(drafter: Drafter, refs: list[Reference], max_new_tokens: int, stop_ids: list[int]) -> dict:
    """tau_mean and tau_pooled (`speculative.tau`) of `drafter` over the reference texts."""
    walks = [greedy_walk(drafter, r.features, r.tokens, r.prompt_len, max_new_tokens, stop_ids) for r in refs]
    lens = [walk.accept_lens for walk in walks]
    return {"tau_mean": tau_mean(lens), "tau_pooled": tau_pooled(lens), "prompts": len(refs)}


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
        for b in benchmarks:
            if b not in self.refs:
                path = self.cache_dir / f"reference-{b}-{self.prompts}x{self.max_new_tokens}.pt"
                self.refs[b] = reference_texts(cfg, self.target, b, self.prompts, self.max_new_tokens, path)
        stops = self.target.stop_token_ids()
        return {b: text_tau(drafter, self.refs[b], self.max_new_tokens, stops) for b in benchmarks}
