"""Rollout throughput: sequential at batch sizes 1, 4 and 16 against parallel rollouts, side by side in one run.

Why: rollouts feed the learner and are the bottleneck of a run on CPU (README). `rollout.batch_size`
verifies B sequences in one target pass, so the target's weights are read once per B rows; a parallel
rollout (`rollout.mode=parallel`, T = 0) rebuilds the same records from the greedy text in two target passes.
Every row rolls out the same GSM8K training prompts with the same draft (the config's, or its seeded random
init) through the rollout actor's own path (`RolloutWorker.rollouts`, buffer inserts left out), at the rollout
dtype and threads of the config. Parallel is measured twice: its first epoch, which decodes each prompt's
greedy text (batch 16), and a later one, which reuses it as every later epoch and draft version does.
T = 0: the table counts the trajectories whose tokens equal sequential batch 1's (batched verification rounds
differently; in bf16 that flips near-ties). tokens/s counts new tokens over wall time, prefill included.

    python -m draft_opd.perf.rollout configs/smol.yaml [key=value ...]
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from draft_opd.actors.rollout import RolloutWorker
from draft_opd.launch.config import load_config

BATCH_SIZES = (1, 4, 16)
PARALLEL_TEXT_BATCH = 16
DEFAULTS = [
    "rollout.prompts=gsm8k_train",
    "rollout.num_prompts=16",
    "rollout.max_new_tokens=64",
    "rollout.num_actors=1",
    "rollout.temperature=0",
    "rollout.store_features=false",
]


def measure(worker: RolloutWorker, count: int, label: str) -> dict:
    start = time.perf_counter()
    trajectories = sorted(worker.rollouts(count), key=lambda t: t.traj_id)
    seconds = time.perf_counter() - start
    new_tokens = sum(len(t.input_ids) - t.prompt_len for t in trajectories)
    steps = sum(len(t.accept_len) for t in trajectories)
    accepted = sum(sum(t.accept_len) for t in trajectories)
    return {
        "rollout": label,
        "batch_size": worker.cfg.batch_size,
        "trajectories": len(trajectories),
        "new_tokens": new_tokens,
        "seconds": seconds,
        "tokens_per_s": new_tokens / seconds,
        "trajectories_per_s": len(trajectories) / seconds,
        "tau_pooled": (accepted + steps) / max(steps, 1),
        "outputs": [t.input_ids for t in trajectories],
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cfg = load_config(argv[0] if argv else "configs/smol.yaml", DEFAULTS + argv[1:])
    count = cfg.rollout.num_prompts
    rows = []
    for batch_size in BATCH_SIZES:
        worker = RolloutWorker(cfg.target, cfg.draft, replace(cfg.rollout, batch_size=batch_size, mode="sequential"))
        worker.proposals(list(range(16)), 3)  # warm-up: first calls allocate and pick kernels
        rows.append(measure(worker, count, f"sequential B={batch_size}"))
        print(f"{rows[-1]['rollout']}: {rows[-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    parallel = replace(cfg.rollout, batch_size=PARALLEL_TEXT_BATCH, mode="parallel")
    worker = RolloutWorker(cfg.target, cfg.draft, parallel)
    worker.proposals(list(range(16)), 3)
    for label in ("parallel, first epoch", "parallel, text reused"):
        worker.pool.position = 0  # the same prompts again: their greedy texts are known now
        rows.append(measure(worker, count, label))
        print(f"{label}: {rows[-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    reference, base = rows[0]["outputs"], rows[0]
    for row in rows:
        row["speedup"] = row["trajectories_per_s"] / base["trajectories_per_s"]
        row["same_tokens_as_b1"] = sum(a == b for a, b in zip(row.pop("outputs"), reference))
    by_label = {r["rollout"]: r for r in rows}
    dtype = cfg.rollout.target_dtype or cfg.target.dtype
    table = Table(
        title=f"{cfg.name}: rollout throughput, {count} {cfg.rollout.prompts} prompts x "
        f"{cfg.rollout.max_new_tokens} new tokens, {cfg.draft.kind} block {cfg.draft.block_size}, {dtype}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    for col in ("rollout", "tokens", "seconds", "tokens/s", "vs sequential B=1", "tau pooled", "same tokens as B=1"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["rollout"],
            str(r["new_tokens"]),
            f"{r['seconds']:.1f}",
            f"{r['tokens_per_s']:.1f}",
            f"{r['speedup']:.2f}x",
            f"{r['tau_pooled']:.2f}",
            f"{r['same_tokens_as_b1']}/{r['trajectories']}",
        )
    Console(width=140).print(table)
    out = Path("runs/bench-rollout.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "config": cfg.name,
                "dtype": dtype,
                "threads": torch.get_num_threads(),
                "draft": {
                    "kind": cfg.draft.kind,
                    "block_size": cfg.draft.block_size,
                    "weights": cfg.draft.path or f"random init, seed {cfg.draft.seed}",
                },
                "prompts": count,
                "max_new_tokens": cfg.rollout.max_new_tokens,
                "parallel_vs_sequential_b1": by_label["parallel, text reused"]["speedup"],
                "parallel_vs_sequential_b16": by_label["parallel, text reused"]["trajectories_per_s"]
                / by_label[f"sequential B={BATCH_SIZES[-1]}"]["trajectories_per_s"],
                "parallel_first_epoch_vs_sequential_b1": by_label["parallel, first epoch"]["speedup"],
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"saved {out}")


if __name__ == "__main__":
    main()
