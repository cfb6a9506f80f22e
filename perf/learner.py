"""Learner throughput against the cost floor of its matmuls, side by side in one run.

Why: offline SFT is the learner alone, so its speed decides how far SFT gets in hours of CPU. Each
setting (sampled blocks per step, torch threads, engine dtype, SFT anchors per sampled row) trains SFT
steps on the same corpus of smol rollouts with stored features, through the learner's own `train_step`
(DeepSpeed engine, world size 1). FLOPs of one step are counted by torch's FlopCounterMode (every matmul
and attention, forward and backward); the machine's matmul peak in the setting's dtype is measured in
the same run at the same thread count (a 2048^3 GEMM). ratio = achieved FLOP/s / that peak: how close a
step is to the floor its matmuls set. tokens/s counts the label tokens a step trains on (what the run
logs as learner_tokens_per_s).

    python -m draft_opd.perf.learner configs/smol.yaml [key=value ...]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from draft_opd.actors.rollout import RolloutWorker
from draft_opd.buffer import BufferConfig, ReplayBuffer
from draft_opd.launch.config import load_config
from draft_opd.learner.engine import Learner

# (blocks per step, threads, dtype, SFT anchors per sampled row); the first is make run's learner
SETTINGS = (
    (16, 1, "float32", 1),
    (256, 2, "float32", 1),
    (256, 2, "float32", 32),
    (256, 2, "bfloat16", 32),
    (512, 2, "bfloat16", 64),
)
DEFAULTS = [
    "rollout.prompts=gsm8k_train",
    "rollout.num_prompts=32",
    "rollout.max_new_tokens=96",
    "rollout.num_actors=1",
    "rollout.batch_size=8",
    "rollout.store_features=true",
    "learner.world_size=1",
]
STEPS = 4  # timed steps per setting, after one untimed


def matmul_peak(threads: int, dtype: torch.dtype, n: int = 2048) -> float:
    """GEMM FLOP/s in `dtype` at `threads`: the floor a step's matmuls could reach."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def measure(learner: Learner, buffer: ReplayBuffer, blocks: int, threads: int, anchors_per_row: int) -> dict:
    torch.set_num_threads(threads)
    learner.objective = replace(learner.objective, sft_anchors_per_row=anchors_per_row)
    rows = -(-blocks // anchors_per_row)
    with FlopCounterMode(display=False) as counter:
        learner.train_step("sft", buffer.sample(rows))  # counted, untimed (also the warm-up)
    flops = counter.get_total_flops()
    times, tokens = [], []
    for _ in range(STEPS):
        out = learner.train_step("sft", buffer.sample(rows))
        times.append(out["step_s"])
        tokens.append(out["tokens"])
    step_s = statistics.median(times)
    peak = matmul_peak(threads, next(learner.drafter.parameters()).dtype)
    return {
        "blocks": blocks,
        "threads": threads,
        "dtype": learner.cfg.dtype,
        "anchors_per_row": anchors_per_row,
        "step_s": step_s,
        "tokens_per_s": statistics.fmean(tokens) / step_s,
        "gflop_per_step": flops / 1e9,
        "achieved_gflop_s": flops / step_s / 1e9,
        "peak_gflop_s": peak / 1e9,
        "ratio": flops / step_s / peak,
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cfg = load_config(argv[0] if argv else "configs/smol.yaml", DEFAULTS + argv[1:])
    console = Console(width=140)
    buffer = ReplayBuffer(BufferConfig(capacity=1000))
    console.print(f"rolling out {cfg.rollout.num_prompts} prompts for the corpus ...")
    RolloutWorker(cfg.target, cfg.draft, cfg.rollout, 0, buffer).run(cfg.rollout.num_prompts)
    learners, rows = {}, []
    for blocks, threads, dtype, anchors_per_row in SETTINGS:
        if dtype not in learners:
            learners[dtype] = Learner(cfg.target, cfg.draft, replace(cfg.learner, dtype=dtype), cfg.objective)
        rows.append(measure(learners[dtype], buffer, blocks, threads, anchors_per_row))
        console.print(
            f"{blocks} blocks, {threads} threads, {dtype}, {anchors_per_row} anchors/row: "
            f"{rows[-1]['tokens_per_s']:.0f} tokens/s",
            highlight=False,
        )
    base = rows[0]["tokens_per_s"]
    table = Table(
        title=f"learner SFT steps on {cfg.name} ({cfg.draft.kind}, block {cfg.draft.block_size}, "
        "stored features); ratio = achieved / measured GEMM peak in the setting's dtype"
    )
    for column in (
        "blocks",
        "threads",
        "dtype",
        "anchors/row",
        "step s",
        "tokens/s",
        "vs first",
        "GFLOP/step",
        "GFLOP/s",
        "peak GFLOP/s",
        "ratio",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / base
        table.add_row(
            str(row["blocks"]),
            str(row["threads"]),
            row["dtype"],
            str(row["anchors_per_row"]),
            f"{row['step_s']:.2f}",
            f"{row['tokens_per_s']:.0f}",
            f"{row['speedup']:.2f}x",
            f"{row['gflop_per_step']:.1f}",
            f"{row['achieved_gflop_s']:.1f}",
            f"{row['peak_gflop_s']:.1f}",
            f"{row['ratio']:.2f}",
        )
    console.print(table)
    out = Path(cfg.train.out_dir) / "bench-learner.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": argv[0] if argv else "configs/smol.yaml", "rows": rows}, indent=2))
    console.print(f"saved {out}")


if __name__ == "__main__":
    main()
