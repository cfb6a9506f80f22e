"""Learner throughput against the cost floor of its matmuls, side by side in one run.

Why: offline SFT is the learner alone, so its speed decides how far SFT gets in hours of CPU. Each
setting (sampled blocks per step, torch threads) trains SFT steps on the same corpus of smol
rollouts with stored features, through the learner's own `train_step` (DeepSpeed engine, world
size 1). FLOPs of one step are counted by torch's FlopCounterMode (every matmul and attention, forward
and backward); the machine's fp32 matmul peak is measured in the same run at the same thread count
(a 2048^3 GEMM). ratio = achieved FLOP/s / that peak: how close a step is to the floor its matmuls set.
tokens/s counts the label tokens a step trains on (what the run logs as learner_tokens_per_s).

    python -m benchmarks.bench_learner configs/smol.yaml [key=value ...]
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

from actors.rollout import RolloutWorker
from buffer import BufferConfig, ReplayBuffer
from launch.config import load_config
from learner.engine import Learner

SETTINGS = ((16, 1), (16, 2), (64, 2), (256, 2))  # (blocks per step, threads); (16, 1) is make run's learner
DEFAULTS = ["rollout.prompts=gsm8k_train", "rollout.num_prompts=8", "rollout.max_new_tokens=96",
            "rollout.num_actors=1", "rollout.batch_size=8", "rollout.store_features=true", "learner.world_size=1"]
STEPS = 4  # timed steps per setting, after one untimed


def matmul_peak(threads: int, n: int = 2048) -> float:
    """fp32 GEMM FLOP/s at `threads`: the floor a step's matmuls could reach."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def measure(learner: Learner, buffer: ReplayBuffer, blocks: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    with FlopCounterMode(display=False) as counter:
        learner.train_step("sft", buffer.sample(blocks))  # counted, untimed (also the warm-up)
    flops = counter.get_total_flops()
    times, tokens = [], []
    for _ in range(STEPS):
        out = learner.train_step("sft", buffer.sample(blocks))
        times.append(out["step_s"])
        tokens.append(out["tokens"])
    step_s, peak = statistics.median(times), matmul_peak(threads)
    return {"blocks": blocks, "threads": threads, "step_s": step_s,
            "tokens_per_s": statistics.fmean(tokens) / step_s, "gflop_per_step": flops / 1e9,
            "achieved_gflop_s": flops / step_s / 1e9, "peak_gflop_s": peak / 1e9, "ratio": flops / step_s / peak}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cfg = load_config(argv[0] if argv else "configs/smol.yaml", DEFAULTS + argv[1:])
    console = Console(width=140)
    buffer = ReplayBuffer(BufferConfig(capacity=1000))
    console.print(f"rolling out {cfg.rollout.num_prompts} prompts for the corpus ...")
    RolloutWorker(cfg.target, cfg.draft, cfg.rollout, 0, buffer).run(cfg.rollout.num_prompts)
    learner = Learner(cfg.target, cfg.draft, cfg.learner, cfg.objective)
    rows = []
    for blocks, threads in SETTINGS:
        rows.append(measure(learner, buffer, blocks, threads))
        console.print(f"{blocks} blocks, {threads} threads: {rows[-1]['tokens_per_s']:.0f} tokens/s", highlight=False)
    base = rows[0]["tokens_per_s"]
    table = Table(title=f"learner SFT steps on {cfg.name} ({cfg.draft.kind}, block {cfg.draft.block_size}, "
                        f"{cfg.learner.dtype}); ratio = achieved / measured fp32 GEMM peak")
    for column in ("blocks", "threads", "step s", "tokens/s", "vs first", "GFLOP/step", "GFLOP/s", "peak GFLOP/s",
                   "ratio"):
        table.add_column(column, justify="right")
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / base
        table.add_row(str(row["blocks"]), str(row["threads"]), f"{row['step_s']:.2f}", f"{row['tokens_per_s']:.0f}",
                      f"{row['speedup']:.2f}x", f"{row['gflop_per_step']:.1f}", f"{row['achieved_gflop_s']:.1f}",
                      f"{row['peak_gflop_s']:.1f}", f"{row['ratio']:.2f}")
    console.print(table)
    out = Path(cfg.train.out_dir) / "bench-learner.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": argv[0] if argv else "configs/smol.yaml", "rows": rows}, indent=2))
    console.print(f"saved {out}")


if __name__ == "__main__":
    main()
