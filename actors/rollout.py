"""Rollout actors: a frozen target and the current draft run target-assisted rollout into the buffer.

At T = 0 the committed tokens are the target's own greedy output, so one trajectory serves both
the SFT baselines (as target-generated text) and Draft-OPD (anchors, proposals, rejections).
`RolloutWorker` is a plain class (tests and one-process runs use it directly); `RolloutActor` is
the same class as a Ray actor, placed by `start_rollout_actors` in a placement group.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from draft_opd.actors.greedy_text import CorpusText, DecodedText, GreedyText
from draft_opd.actors.prompts import PromptPool, load_prompts
from draft_opd.actors.requests import Request, decode_requests, fits_context, trajectory_id
from draft_opd.buffer import Trajectory
from draft_opd.prompts.chat import render_first_turn
from draft_opd.speculative.decode import DecodeConfig, DecodeResult, block_size_of, generate
from draft_opd.speculative.loading import DraftSpec, make_drafter
from draft_opd.speculative.parallel_rollout import rollout_on_text
from draft_opd.speculative.runtime import set_threads
from draft_opd.speculative.target import TargetConfig, load_target
from draft_opd.speculative.tau import tau_mean, tau_pooled

ROLLOUT_MODES = ("auto", "parallel", "sequential")


@dataclass
class RolloutConfig:
    num_actors: int = 1
    prompts: str = "gsm8k_train"  # a benchmark name or a .json/.jsonl prompt file
    num_prompts: int | None = None  # use the first N prompts only
    max_new_tokens: int = 256
    temperature: float = 0.0
    topk_logprobs: int = 0  # also store the target's top-k at draft positions
    store_features: bool = False  # store target features (fp16) so the learner needs no target copy
    target_dtype: str | None = None  # the rollout target's dtype when it should differ from target.dtype
    threads: int = 1  # torch threads per actor
    batch_size: int = 1  # sequences decoded at once (one verify pass); run(n) rounds n up to a multiple of it
    num_cpus: float = 1.0  # per actor
    num_gpus: float = 0.0  # per actor
    placement_timeout_s: float = 60.0
    mode: str = "auto"  # parallel | sequential | auto: parallel at T = 0, sequential at T > 0
    text_corpus: str | None = None  # parallel: greedy texts from this `draft-opd generate` corpus where it has them
    # parallel: record the target's log-probs of proposals past a block's first mismatch, which only the rejected
    # stream reads (objective.rejected_weight > 0); false skips that target pass and stores NaN there
    off_text_logprobs: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ROLLOUT_MODES:
            raise ValueError(f"rollout.mode={self.mode!r} is not one of {', '.join(ROLLOUT_MODES)}")
        if self.mode == "parallel" and self.temperature > 0:
            raise ValueError(
                f"rollout.mode=parallel needs rollout.temperature=0 (got {self.temperature}): at T > 0 the "
                "committed text depends on the draft; use rollout.mode=sequential or auto"
            )

    @property
    def parallel(self) -> bool:
        """Whether rollouts are rebuilt from the greedy text (`speculative.parallel_rollout`) or decoded."""
        return self.mode == "parallel" or (self.mode == "auto" and self.temperature == 0)


def to_trajectory(result: DecodeResult, traj_id: str, prompt_id: str, draft_version: int, actor_id: str) -> Trajectory:
    steps = result.steps
    topk = steps and steps[0].topk_ids is not None
    features = result.features.to(torch.float16).numpy() if result.features is not None else None
    return Trajectory(
        traj_id=traj_id,
        prompt_id=prompt_id,
        draft_version=draft_version,
        actor_id=actor_id,
        created_at=time.time(),
        input_ids=result.tokens,
        prompt_len=result.prompt_len,
        anchors=[s.anchor for s in steps],
        draft_tokens=[s.draft_tokens for s in steps],
        accept_len=[s.accept_len for s in steps],
        committed_logprobs=result.committed_logprobs,
        draft_logprobs=[s.draft_logprobs for s in steps],
        topk_ids=[s.topk_ids or [] for s in steps] if topk else None,
        topk_logprobs=[s.topk_logprobs or [] for s in steps] if topk else None,
        features=features,
    )


def lost_positions(pool: PromptPool, end: int, held: set[str]) -> list[int]:
    """Positions before `end` of an actor's prompt stream whose trajectories are gone although earlier ones are held:
    the rows of a buffer segment skipped as corrupt. Rows before the first one held were evicted (FIFO), not lost."""
    ids = [trajectory_id(*pool.at(p)) for p in range(end)]
    first = next((p for p, t in enumerate(ids) if t in held), end)
    return [p for p in range(first, end) if ids[p] not in held]


def acceptance_by_position(accept_len: list[int], proposals: int) -> list[float]:
    """Share of verify steps whose draft token at block position j (1-based) was accepted."""
    if not accept_len:
        return [0.0] * proposals
    return [sum(a >= j for a in accept_len) / len(accept_len) for j in range(1, proposals + 1)]


def insert(buffer, trajectory: Trajectory) -> int:
    """Insert into a local ReplayBuffer or a Ray buffer actor alike."""
    batch = trajectory.to_record_batch()
    if hasattr(buffer.insert, "remote"):
        return ray.get(buffer.insert.remote(batch))
    return buffer.insert(batch)


class RolloutWorker:
    """Loads the target once; holds the draft and its version; turns prompts into trajectories."""

    def __init__(
        self, target: TargetConfig, draft: DraftSpec, rollout: RolloutConfig, actor_index: int = 0, buffer=None
    ):
        if rollout.batch_size < 1:
            raise ValueError(f"rollout.batch_size must be >= 1 (got {rollout.batch_size}); 1 decodes one at a time")
        set_threads(rollout.threads)
        self.cfg = rollout
        self.buffer = ray.get_actor(buffer) if isinstance(buffer, str) else buffer  # a named buffer actor, or local
        self.actor_id = f"rollout-{actor_index}"
        self.target = load_target(replace(target, dtype=rollout.target_dtype) if rollout.target_dtype else target)
        self.drafter = make_drafter(draft.or_random(), self.target)
        self.thinking = target.thinking
        self.version = 0
        self.redo: list[int] = []  # stream positions to roll out again first (`restore`)
        self.pool = PromptPool(load_prompts(rollout.prompts, rollout.num_prompts), actor_index, rollout.num_actors)
        self.decode = DecodeConfig(
            max_new_tokens=rollout.max_new_tokens,
            temperature=rollout.temperature,
            topk_logprobs=rollout.topk_logprobs,
            keep_features=rollout.store_features,
            off_text_logprobs=rollout.off_text_logprobs,
        )
        self.text = self._greedy_text() if rollout.parallel else None

    def _greedy_text(self) -> GreedyText:
        decoded = DecodedText(self.target, self.decode, self.cfg.batch_size)
        if self.cfg.text_corpus is None:
            return decoded
        return CorpusText(self.cfg.text_corpus, self.decode.max_new_tokens, self.target.stop_token_ids(), decoded)

    def rollout(self) -> Trajectory:
        """One trajectory from the next prompt that fits the target's context (its first user turn)."""
        return next(self.rollouts(1))

    def rollouts(self, count: int) -> Iterator[Trajectory]:
        """`count` trajectories from the next prompts that fit, in the order they finish: in parallel mode rebuilt
        from each prompt's greedy text (decoded rollout.batch_size at a time, once per prompt), else decoded
        rollout.batch_size at once."""
        requests = self._requests(count)
        if self.text is not None:
            decoded = (
                (r, rollout_on_text(self.target, self.drafter, text, len(r.prompt), self.decode))
                for r, text in self.text.texts(requests)
            )
        elif self.cfg.batch_size == 1:
            decoded = (
                (r, generate(self.target, r.prompt, self.drafter, replace(self.decode, seed=r.seed))) for r in requests
            )
        else:
            decoded = decode_requests(self.target, self.drafter, self.decode, self.cfg.batch_size, requests)
        for request, result in decoded:
            yield to_trajectory(result, request.traj_id, request.prompt_id, self.version, self.actor_id)

    def _requests(self, count: int) -> Iterator[Request]:
        """The next `count` prompts that fit the target's context.

        A prompt too long for prompt + rollout.max_new_tokens is skipped with a warning, so one long
        row cannot stop training; a whole pass over this actor's prompts with none that fits is an
        error rather than an endless loop.
        """
        block, misses = block_size_of(self.drafter, self.decode), 0
        while count > 0:
            taken = self.pool.at(self.redo.pop(0)) if self.redo else self.pool.next()
            request = Request.of(self.target.tokenizer, *taken, self.thinking)
            if not fits_context(
                self.target, request, self.cfg.max_new_tokens, block, self.actor_id, "rollout.max_new_tokens"
            ):
                misses += 1
                if misses >= len(self.pool.indices):
                    raise ValueError(
                        f"{self.actor_id}: none of its {len(self.pool.indices)} prompts from "
                        f"rollout.prompts={self.cfg.prompts} fits the target's context with rollout."
                        f"max_new_tokens={self.cfg.max_new_tokens}; lower rollout.max_new_tokens or "
                        "use shorter prompts"
                    ) from None
                continue
            misses, count = 0, count - 1
            yield request

    def run(self, num_trajectories: int) -> dict[str, float]:
        """Roll out and insert `num_trajectories` (rounded up to whole batches of rollout.batch_size); returns
        tau and throughput of this batch of work."""
        start, accept_lens, tokens = time.perf_counter(), [], 0
        batches = -(-num_trajectories // self.cfg.batch_size)
        for traj in self.rollouts(batches * self.cfg.batch_size):
            insert(self.buffer, traj)
            accept_lens.append(traj.accept_len)
            tokens += len(traj.input_ids) - traj.prompt_len
        elapsed = time.perf_counter() - start
        steps = [a for accept_len in accept_lens for a in accept_len]
        return {
            "actor": self.actor_id,
            "draft_version": self.version,
            "trajectories": len(accept_lens),
            "tau": tau_pooled(accept_lens),
            "tokens": tokens,
            "verify_steps": len(steps),
            "tokens_per_s": tokens / elapsed,
            "acceptance_by_position": acceptance_by_position(steps, self.drafter.cfg.block_size - 1),
            "prompt_position": self.pool.position,
        }

    def evaluate_tau(
        self, benchmark: str, num_prompts: int, max_new_tokens: int, path: str | None = None
    ) -> dict[str, float]:
        """Held-out tau of the current draft (T = 0): `eval_tau` is tau_mean (mean over prompts of each prompt's
        mean), `eval_tau_pooled` tau_pooled."""
        from draft_opd.prompts.sets import load_benchmark

        accept_lens = []
        for conv in load_benchmark(benchmark, path, num_prompts):
            prompt = render_first_turn(self.target.tokenizer, conv.turns[0], self.thinking)
            result = generate(self.target, prompt, self.drafter, DecodeConfig(max_new_tokens=max_new_tokens))
            accept_lens.append([s.accept_len for s in result.steps])
        return {
            "eval_tau": tau_mean(accept_lens),
            "eval_tau_pooled": tau_pooled(accept_lens),
            "draft_version": self.version,
        }

    def set_draft(self, version: int, weights: dict[str, torch.Tensor]) -> bool:
        """Apply published weights if they are newer than ours; drafter state is per-rollout, so nothing is cached."""
        if version <= self.version:
            return False
        self.drafter.load_state_dict(weights)
        self.version = version
        return True

    def draft_version(self) -> int:
        return self.version

    def restore(self, position: int, present: list[str]) -> int:
        """Continue the prompt stream at `position`, past prompts whose trajectories are in `present`, after
        rolling out again the prompts whose rows were lost (`lost_positions`).

        After a restart the buffer may already hold trajectories rolled out after the checkpoint
        that recorded `position`; skipping those means no prompt is repeated and none skipped.
        """
        held = set(present)
        self.redo = lost_positions(self.pool, position, held)
        self.pool.position = position
        while trajectory_id(*self.pool.peek()) in held:
            self.pool.position += 1
        return self.pool.position

    def proposals(self, prompt: list[int], n: int) -> list[int]:
        """The draft's first block of proposals for a prompt (to see published weights take effect)."""
        out = self.target.forward(torch.tensor(prompt), 0, None)
        state = self.drafter.begin(out.features, torch.tensor(prompt))
        draft, _ = self.drafter.propose(state, out.logits[-1].argmax(), len(prompt), n, lambda x: x.argmax(-1))
        return draft.tolist()

    def pid(self) -> int:
        return os.getpid()


RolloutActor = ray.remote(RolloutWorker)


def start_rollout_actors(
    target: TargetConfig,
    draft: DraftSpec,
    rollout: RolloutConfig,
    buffer: str | None,
) -> tuple[list, object]:
    """N rollout actors in one placement group, writing to the buffer actor named `buffer`
    (`buffer.start_named_buffer`: Ray restarts the actors, and a handle among their arguments might not
    survive that); fails with a clear error when the cluster lacks resources."""
    if rollout.num_actors < 1:
        raise ValueError(f"rollout.num_actors must be >= 1 (got {rollout.num_actors})")
    bundle = {"CPU": rollout.num_cpus, **({"GPU": rollout.num_gpus} if rollout.num_gpus else {})}
    need = {k: v * rollout.num_actors for k, v in bundle.items()}
    have = ray.cluster_resources()
    short = {k: f"{v:g} needed, {have.get(k, 0):g} in the cluster" for k, v in need.items() if have.get(k, 0) < v}
    if short:
        raise ValueError(
            f"{rollout.num_actors} rollout actors need more than the cluster has ({short}); "
            "lower rollout.num_actors or rollout.num_cpus/num_gpus, or add nodes"
        )
    group = placement_group([bundle] * rollout.num_actors, strategy="PACK")
    try:
        ray.get(group.ready(), timeout=rollout.placement_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise TimeoutError(
            f"placement group for {rollout.num_actors} rollout actors not ready after "
            f"{rollout.placement_timeout_s:g} s (resources held by other jobs?)"
        ) from None
    actors = [
        RolloutActor.options(
            num_cpus=rollout.num_cpus,
            num_gpus=rollout.num_gpus,
            max_restarts=-1,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, i),
        ).remote(target, draft, rollout, i, buffer)
        for i in range(rollout.num_actors)
    ]
    return actors, group
