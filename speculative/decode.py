"""The speculative decode loop: prefill, draft, verify, commit, crop. Batch 1, as the field measures.

The steps of one sequence (`start_row`, `draft_block`, `commit_block`, `finish_row`) are shared with
the batched rollout loop in `speculative.batch_decode`.

Block size 1 (no drafter) is plain autoregressive decoding through the same loop, so the
speedup baseline pays exactly the same per-step overheads. Each verify step yields a
`StepRecord` (anchor, proposals, accept length, the target's log-probs of drafted and of
committed tokens): what rollout actors stream to the replay buffer, at no extra target cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from draft_opd.speculative.drafter import Drafter, DraftState, ProposeRequest
from draft_opd.speculative.target import Target, crop_cache
from draft_opd.speculative.verify import sampling_probs, verify_greedy, verify_sampling


@dataclass
class DecodeConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0
    block_size: int | None = None  # None: the drafter's own; 1: plain decoding
    topk_logprobs: int = 0  # also record the target's top-k at draft positions
    seed: int = 0
    stop_token_ids: list[int] | None = None  # None: the target's EOS tokens
    keep_features: bool = False  # return the target features of every position (for the replay buffer)
    # parallel rollouts: the target's log-probs of the proposals past a block's first mismatch (the rejected
    # stream's teacher); False skips their target pass and records NaN there (decoding has them for free)
    off_text_logprobs: bool = True

    def __post_init__(self) -> None:
        # max_new_tokens 0 would still commit the prefill's token, a negative T would silently mean greedy
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature}); 0 is greedy decoding")


@dataclass
class StepRecord:
    anchor: int  # position of the last committed token, where the block began
    draft_tokens: list[int]  # proposals for positions anchor+1 ...
    accept_len: int  # proposals accepted; committed = accepted + 1 bonus token
    draft_logprobs: list[float]  # the target's log-prob of each proposal
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None

    @property
    def tau(self) -> int:
        return self.accept_len + 1


@dataclass
class DecodeResult:
    tokens: list[int]  # prompt + response
    prompt_len: int
    committed_logprobs: list[float]  # the target's log-prob of each response token
    steps: list[StepRecord] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stopped: bool = False  # ended on a stop token (not on the length limit)
    features: torch.Tensor | None = None  # [len(tokens), F] with DecodeConfig.keep_features

    @property
    def response(self) -> list[int]:
        return self.tokens[self.prompt_len :]

    @property
    def num_new_tokens(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def time_per_output_token(self) -> float:
        """Decode time per output token, prefill excluded (dflash's benchmark protocol)."""
        return self.decode_s / max(self.num_new_tokens, 1)


class TokenPicker:
    """Greedy at T = 0, else a seeded sample from softmax(logits / T)."""

    def __init__(self, temperature: float, generator: torch.Generator):
        self.temperature, self.generator = temperature, generator

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature <= 0:
            return logits.argmax(dim=-1)
        probs = sampling_probs(logits, self.temperature)
        return torch.multinomial(probs, 1, generator=self.generator).view(-1)


class ContextTooLongError(ValueError):
    """Prompt + max_new_tokens do not fit the target's context; callers may skip the prompt or name their own fix."""

    def __init__(self, problem: str, fix: str = "lower max_new_tokens or shorten the prompt"):
        super().__init__(f"{problem}; {fix}")
        self.problem = problem


def block_size_of(drafter: Drafter | None, cfg: DecodeConfig) -> int:
    """The verify block `generate` uses: 1 without a drafter, else the config's or the drafter's own."""
    return 1 if drafter is None else (cfg.block_size or drafter.cfg.block_size)


def check_context(target: Target, prompt_len: int, max_new_tokens: int, block_size: int) -> None:
    """Refuse up front: positions past the target's context would decode, but to garbage."""
    limit = int(getattr(target.config, "max_position_embeddings", 0) or 0)
    need = prompt_len + max_new_tokens + block_size
    if limit and need > limit:
        raise ContextTooLongError(
            f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} (+ block "
            f"{block_size}) exceeds the target's context of {limit} positions"
        )


def _step_record(anchor: int, draft: torch.Tensor, accepted: int, logp: torch.Tensor, topk: int) -> StepRecord:
    n = draft.shape[0]
    rows = torch.arange(n)
    record = StepRecord(
        anchor=anchor, draft_tokens=draft.tolist(), accept_len=accepted, draft_logprobs=logp[rows, draft].tolist()
    )
    if topk > 0 and n > 0:
        values, ids = logp[:n].topk(topk, dim=-1)
        record.topk_ids, record.topk_logprobs = ids.tolist(), values.tolist()
    return record


@dataclass
class Row:
    """One sequence being decoded: its result so far, where its next block starts, its drafter state and sampler.

    `generate` drives one Row; `speculative.batch_decode` drives several over a shared target cache. Both
    use the same steps (`start_row`, `draft_block`, `commit_block`, `finish_row`), so a row's records do
    not depend on how many rows share the verify pass.
    """

    result: DecodeResult
    anchor_pos: int  # position of the last committed token (not yet in the target cache)
    anchor: torch.Tensor  # that token, shape []
    state: DraftState | None
    pick: TokenPicker
    generator: torch.Generator
    stop_ids: torch.Tensor
    kept: list[torch.Tensor] = field(default_factory=list)  # target features, with DecodeConfig.keep_features

    def done(self, cfg: DecodeConfig) -> bool:
        return self.result.stopped or self.result.num_new_tokens >= cfg.max_new_tokens


def start_row(
    target: Target,
    prompt: list[int] | torch.Tensor,
    drafter: Drafter | None,
    cfg: DecodeConfig,
    cache: DynamicCache,
    seed: int,
) -> Row:
    """Prefill `prompt` into `cache`, pick the first token and hand the prompt's features to the drafter."""
    prompt_ids = torch.as_tensor(prompt, dtype=torch.long, device=target.device).view(-1)
    if prompt_ids.numel() == 0:
        raise ValueError("empty prompt: at least one token is needed to start decoding")
    block = block_size_of(drafter, cfg)
    check_context(target, prompt_ids.numel(), cfg.max_new_tokens, block)
    generator = torch.Generator(device=target.device).manual_seed(seed)
    pick = TokenPicker(cfg.temperature, generator)
    stops = target.stop_token_ids() if cfg.stop_token_ids is None else cfg.stop_token_ids
    stop_ids = torch.tensor(stops, dtype=torch.long, device=target.device)
    use_draft = block > 1

    t0 = time.perf_counter()
    out = target.forward(prompt_ids, 0, cache, with_features=use_draft or cfg.keep_features)
    first = pick(out.logits[-1:])
    result = DecodeResult(
        tokens=prompt_ids.tolist() + first.tolist(),
        prompt_len=prompt_ids.numel(),
        committed_logprobs=torch.log_softmax(out.logits[-1], -1)[first].tolist(),
    )
    result.stopped = bool(torch.isin(first, stop_ids).any())
    row = Row(
        result=result,
        anchor_pos=prompt_ids.numel(),
        anchor=first[0],
        pick=pick,
        generator=generator,
        state=drafter.begin(out.features, prompt_ids) if use_draft else None,
        stop_ids=stop_ids,
    )
    if cfg.keep_features:
        row.kept.append(out.features)
    result.prefill_s = time.perf_counter() - t0
    return row


def draft_block(row: Row, drafter: Drafter | None, cfg: DecodeConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The row's proposals after its anchor (none with block size 1 or at the length limit) and their logits."""
    return draft_blocks([row], drafter, cfg)[0]


def draft_blocks(
    rows: list[Row], drafter: Drafter | None, cfg: DecodeConfig
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """`draft_block` for each row, drafted together (`Drafter.propose_rows`): a batched rollout's rows share
    the drafter's work where the drafter allows it."""
    sizes = [min(block_size_of(drafter, cfg) - 1, cfg.max_new_tokens - row.result.num_new_tokens - 1) for row in rows]
    drafting = [i for i, n in enumerate(sizes) if n > 0]
    blocks: list[tuple[torch.Tensor, torch.Tensor | None]] = [(row.anchor.new_empty(0), None) for row in rows]
    if drafting:
        requests = [
            ProposeRequest(rows[i].state, rows[i].anchor, rows[i].anchor_pos, sizes[i], rows[i].pick) for i in drafting
        ]
        for i, block in zip(drafting, drafter.propose_rows(requests)):
            blocks[i] = block
    return blocks


def commit_block(
    row: Row,
    draft: torch.Tensor,
    draft_logits: torch.Tensor | None,
    logits: torch.Tensor,
    features: torch.Tensor,
    drafter: Drafter | None,
    cfg: DecodeConfig,
) -> int:
    """Verify the row's block from the target's `logits`/`features` ([1 + len(draft), ...]), commit the
    accepted tokens and the bonus token, record the step and feed the drafter; returns the tokens committed.
    The caller keeps the committed positions of its cache and drops the rest."""
    result, n = row.result, draft.shape[0]
    if cfg.temperature <= 0:
        accepted, bonus = verify_greedy(draft, logits)
    elif n > 0:
        accepted, bonus = verify_sampling(
            draft, sampling_probs(draft_logits, cfg.temperature), sampling_probs(logits, cfg.temperature), row.generator
        )
    else:
        accepted, bonus = 0, row.pick(logits[:1])[0]
    verify_ids = torch.cat([row.anchor.view(1), draft])
    committed = torch.cat([draft[:accepted], bonus.view(1)])
    stops = torch.isin(committed, row.stop_ids).nonzero()
    if stops.numel():
        committed = committed[: int(stops[0]) + 1]
        accepted, draft = min(accepted, int(stops[0])), draft[: min(accepted, int(stops[0]))]
        result.stopped = True
    logp = torch.log_softmax(logits, dim=-1)
    result.committed_logprobs += logp[torch.arange(committed.numel()), committed].tolist()
    result.tokens += committed.tolist()
    if cfg.keep_features:
        row.kept.append(features[: accepted + 1])
    if row.state is not None:
        result.steps.append(_step_record(row.anchor_pos, draft, accepted, logp, cfg.topk_logprobs))
        drafter.extend(row.state, features[: accepted + 1], verify_ids[: accepted + 1], row.anchor_pos)
    else:
        result.steps.append(StepRecord(anchor=row.anchor_pos, draft_tokens=[], accept_len=0, draft_logprobs=[]))
    row.anchor_pos, row.anchor = row.anchor_pos + accepted + 1, committed[-1]
    return accepted + 1


def finish_row(row: Row, last_features: torch.Tensor | None) -> DecodeResult:
    """With DecodeConfig.keep_features, the features of the last token (never verified) complete the row's."""
    if last_features is not None:
        row.result.features = torch.cat([*row.kept, last_features])
    return row.result


@torch.inference_mode()
def generate(
    target: Target, prompt: list[int] | torch.Tensor, drafter: Drafter | None = None, cfg: DecodeConfig | None = None
) -> DecodeResult:
    """Decode one prompt; token-identical to plain greedy decoding at T = 0, distribution-exact at T > 0."""
    cfg = cfg or DecodeConfig()
    cache = target.new_cache()
    row = start_row(target, prompt, drafter, cfg, cache, cfg.seed)
    t1 = time.perf_counter()
    with_features = row.state is not None or cfg.keep_features
    while not row.done(cfg):
        draft, draft_logits = draft_block(row, drafter, cfg)
        out = target.forward(torch.cat([row.anchor.view(1), draft]), row.anchor_pos, cache, with_features)
        commit_block(row, draft, draft_logits, out.logits, out.features, drafter, cfg)
        crop_cache(cache, row.anchor_pos)
    row.result.decode_s = time.perf_counter() - t1
    last = target.forward(row.anchor.view(1), row.anchor_pos, cache).features if cfg.keep_features else None
    return finish_row(row, last)
