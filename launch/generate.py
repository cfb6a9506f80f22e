"""`draft-opd generate CONFIG [key=value ...]`: the target's own responses to training prompts, the corpus of
offline SFT (the DFlash/EAGLE-3 recipe, SpecForge's data regeneration).

The corpus is a replay-buffer directory: one `Trajectory` per prompt (traj_id from `trajectory_id`, epoch 0;
draft version 0, actor "generate"), the response and the target's log-probs of it, in sealed Arrow segments.
Its verify steps are those of plain decoding (block size 1): one anchor per response token, no proposals. The
buffer samples blocks by anchor, so a row without any would never be drawn; with them the SFT phase draws a
trajectory in proportion to its response length and picks its own random anchors in it. So the learner's
SFT phase reads it as it reads rollouts (`train.sft_corpus`), and `ReplayBuffer(BufferConfig(dir=OUT))`
reopens it. Prompts are decoded `generate.batch_size` at a time
(`generate_batch`, no drafter); the corpus is sealed after every batch of finished rows, and a rerun skips
the prompts it already holds, so a killed job loses at most the rows of the batch in flight.

Target features are not stored by default (`generate.store_features=false`): the learner recomputes them
with one prefill per sampled trajectory. Measured on smol (features of 3 layers x hidden 576, fp32, 2 cores,
`runs/measure_generate.py` in the issue report): stored fp16 features take 3,479 bytes per token against 23
for the rest of a row (150x the corpus); reading them back (memory-mapped, fp16 -> fp32) costs 0.02 ms per
token; the recompute, a 256-token forward with features, 0.88 s, i.e. 3.4 ms per token, about a third of
an SFT learner step's ~10 ms per token here. A corpus outlives many runs and grows with the prompt set: the
paper's 16K prompts x 4K tokens on Qwen3-8B (5 x 4096 features) would store about 2.7 TB, where the
recompute is one prefill on the learner's GPU. Store them (`generate.store_features=true`) when disk is
cheap and the learner is CPU-bound or has no room for a target copy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from rich.console import Console

from draft_opd.actors.prompts import load_prompts
from draft_opd.actors.requests import Request, decode_requests, fits_context
from draft_opd.actors.rollout import to_trajectory
from draft_opd.buffer import CORPUS_CAPACITY, BufferConfig, ReplayBuffer, foreign_files
from draft_opd.launch.config import Config, job_main
from draft_opd.launch.progress import StepProgress
from draft_opd.prompts.sets import Conversation
from draft_opd.speculative.decode import DecodeConfig
from draft_opd.speculative.loading import make_drafter
from draft_opd.speculative.runtime import set_threads
from draft_opd.speculative.target import Target, load_target

ACTOR_ID = "generate"


@dataclass
class Plan:
    """The generate section with its defaults taken from the rollout section."""

    out: Path
    prompts: str
    num_prompts: int | None
    batch_size: int
    decode: DecodeConfig


def plan_of(cfg: Config) -> Plan:
    gen = cfg.generate
    if not gen.out:
        raise ValueError(
            "generate.out is not set: pass generate.out=DIR, a new directory for the corpus "
            "(or one that an earlier `draft-opd generate` wrote, to complete it)"
        )
    if gen.prompts:
        prompts, num_prompts = gen.prompts, gen.num_prompts
    else:  # the rollouts' prompt stream
        prompts, num_prompts = cfg.rollout.prompts, gen.num_prompts or cfg.rollout.num_prompts
    decode = DecodeConfig(
        max_new_tokens=gen.max_new_tokens or cfg.rollout.max_new_tokens,
        temperature=gen.temperature,
        keep_features=gen.store_features,
    )
    return Plan(Path(gen.out), prompts, num_prompts, gen.batch_size, decode)


def check_out(out: Path) -> None:
    """The corpus goes to a new or empty directory, or one holding a buffer's files only (a corpus to resume)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"generate.out={out} is a file, not a directory: pass a new directory for the corpus")
    foreign = foreign_files(out)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise ValueError(
            f"generate.out={out} holds {foreign[0]!r}{more}, so it is not a corpus: pass a new or "
            "empty directory, or one that `draft-opd generate` wrote"
        )


def open_corpus(out: Path) -> ReplayBuffer:
    """The corpus as a buffer that never evicts nor rate-limits; refused if it holds rows of another writer
    (a training run's replay buffer, whose rollouts come from drafts and another target dtype)."""
    corpus = ReplayBuffer(BufferConfig(dir=str(out), capacity=CORPUS_CAPACITY, samples_per_insert=None, timeout_s=None))
    other = next((t for t in corpus.traj_ids() if corpus.get(t).actor_id != ACTOR_ID), None)
    if other is not None:
        raise ValueError(
            f"generate.out={out} holds trajectory {other!r} written by "
            f"{corpus.get(other).actor_id!r}, not by generate (a run's replay buffer?): pass another "
            "directory"
        )
    return corpus


def frequent_tokens(out: Path, n: int, vocab_size: int) -> torch.Tensor:
    """The `n` target ids most frequent in the responses of the corpus at `out` (ties: the smaller id), the
    draft vocabulary of an EAGLE-3 drafter trained on it; ids the responses never hold fill the rest, in order."""
    with open_corpus(out) as corpus:
        rows = [corpus.get(t) for t in corpus.traj_ids()]
    if not rows:
        raise ValueError(f"the corpus at {out} holds no trajectories: run `draft-opd generate` first")
    counts = np.zeros(vocab_size, dtype=np.int64)
    for row in rows:
        counts += np.bincount(np.asarray(row.input_ids[row.prompt_len :]), minlength=vocab_size)
    return torch.from_numpy(np.argsort(-counts, kind="stable")[:n].astype(np.int64))


def pending(
    target: Target, convs: list[Conversation], thinking: bool, plan: Plan, present: set[str]
) -> tuple[list[Request], int]:
    """(the prompts still to decode, how many prompts the corpus will hold): prompts too long for the context
    are skipped with a warning; none fitting is an error."""
    requests = [Request.of(target.tokenizer, 0, conv, thinking) for conv in convs]
    fitting = [
        r
        for r in requests
        if fits_context(target, r, plan.decode.max_new_tokens, 1, ACTOR_ID, "generate.max_new_tokens")
    ]
    if not fitting:
        raise ValueError(
            f"none of the {len(requests)} prompts of generate.prompts={plan.prompts} fits the target's "
            f"context with generate.max_new_tokens={plan.decode.max_new_tokens}; lower "
            "generate.max_new_tokens or use shorter prompts"
        )
    todo = [r for r in fitting if r.traj_id not in present]
    if len(present) + len(todo) > CORPUS_CAPACITY:  # the learner would evict (and delete) the oldest rows
        raise ValueError(
            f"{len(present) + len(todo)} trajectories exceed the corpus capacity of {CORPUS_CAPACITY}; "
            "lower generate.num_prompts and write the rest to another corpus"
        )
    return todo, len(fitting)


def feature_target(cfg: Config, store: bool) -> Target:
    """The target; with stored features, its feature layers are the draft's (resolved as rollouts resolve them)."""
    target = load_target(cfg.target)
    if store:
        make_drafter(cfg.draft.or_random(), target)
    return target


def generate_corpus(cfg: Config, console: Console | None = None) -> dict[str, object]:
    """Decode every prompt the corpus at generate.out does not hold yet; returns counts and throughput."""
    console = console or Console(stderr=True, soft_wrap=True)
    set_threads(cfg.threads)
    plan = plan_of(cfg)
    check_out(plan.out)
    convs = load_prompts(plan.prompts, plan.num_prompts, key="generate.prompts")  # bad prompts fail before loading
    console.print(f"loading target ({cfg.target.testbed or cfg.target.path}) ...")
    transformers.logging.disable_progress_bar()  # the line above says it; the job's one progress line follows
    target = feature_target(cfg, plan.decode.keep_features)
    with open_corpus(plan.out) as corpus:
        todo, total = pending(target, convs, cfg.target.thinking, plan, set(corpus.traj_ids()))
        done, tokens, start = total - len(todo), 0, time.perf_counter()
        console.print(
            f"corpus {plan.out}: {done} of {total} prompts present, generating {len(todo)} "
            f"(batch {plan.batch_size}, max_new_tokens {plan.decode.max_new_tokens})"
        )
        with StepProgress(console, total, done, label="generate", unit="prompt") as progress:
            progress.update(done)
            decoded = decode_requests(target, None, plan.decode, plan.batch_size, todo)
            for count, (request, result) in enumerate(decoded, 1):
                corpus.insert(to_trajectory(result, request.traj_id, request.prompt_id, 0, ACTOR_ID))
                tokens += result.num_new_tokens
                if count % plan.batch_size == 0 or count == len(todo):  # a batch's rows land together
                    corpus.flush()
                    rate = tokens / (time.perf_counter() - start)
                    progress.update(done + count, status=f"{rate:.1f} tok/s")  # no ETA from one row of a batch
        size = len(corpus)
    elapsed = time.perf_counter() - start
    summary = {
        "corpus": str(plan.out),
        "trajectories": size,
        "generated": len(todo),
        "new_tokens": tokens,
        "tokens_per_s": tokens / elapsed if todo else 0.0,
        "wall_s": elapsed,
    }
    console.print(
        f"corpus {plan.out}: {size} trajectories ({len(todo)} generated now, {tokens} tokens, "
        f"{summary['tokens_per_s']:.1f} tokens/s)"
    )
    return summary


def main(argv: list[str] | None = None) -> None:
    job_main(generate_corpus, "generate", argv)


if __name__ == "__main__":
    main()
