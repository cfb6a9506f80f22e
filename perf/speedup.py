"""`make bench-speedup`: the phases of one speculative step against one plain decode step, per lever.

Why: speculative decoding pays only when a step (drafter pass + verify + bookkeeping) costs less than tau
plain steps. Each row decodes the same GSM8K test prompts with the same draft, through the decode loop's
own steps (`start_row`, `draft_block`, `Target.forward`, `commit_block`), and times every phase of every
step; a plain step (the same loop at block size 1, on its own cache at the same length) is timed right
after each speculative step, so machine noise hits both alike. Rows vary one lever at a time: the target's
weight layout (as loaded, pre-transposed), the verify block size, the threads.
A last table compares the project's plain loop with Hugging Face `generate` on the same target, dtype and
threads (time per output token, prefill excluded), so the speedup's baseline is not a slow loop.

    python -m draft_opd.perf.speedup configs/smol.yaml [draft=DIR] [key=value ...]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from draft_opd.launch.config import Config, load_config
from draft_opd.prompts.chat import render_first_turn
from draft_opd.prompts.sets import load_benchmark
from draft_opd.speculative.decode import DecodeConfig, commit_block, draft_block, generate, start_row
from draft_opd.speculative.drafter import Drafter
from draft_opd.speculative.loading import make_drafter
from draft_opd.speculative.runtime import set_threads
from draft_opd.speculative.target import Target, crop_cache
from draft_opd.speculative.testbeds import load_testbed

PROMPTS, NEW_TOKENS, WARMUP_STEPS = 3, 96, 2
LAYOUTS = {"as loaded (F.linear)": False, "pre-transposed": True}


@dataclass
class Phases:
    """Seconds of each phase of every timed step, and the accept lengths."""

    draft: list[float] = field(default_factory=list)
    verify: list[float] = field(default_factory=list)
    bookkeeping: list[float] = field(default_factory=list)
    step: list[float] = field(default_factory=list)
    plain: list[float] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def plain_step(target: Target, cache, token: torch.Tensor, position: int) -> float:
    """One plain decode step at `position` (as the block-size-1 loop runs it), cropped back afterwards."""
    start = time.perf_counter()
    out = target.forward(token.view(1), position, cache, with_features=False)
    torch.log_softmax(out.logits, dim=-1)  # what commit_block does with a plain step's logits
    elapsed = time.perf_counter() - start
    crop_cache(cache, position)
    return elapsed


@torch.inference_mode()
def measure(target: Target, drafter: Drafter, prompts: list[list[int]], block_size: int) -> Phases:
    cfg = DecodeConfig(max_new_tokens=NEW_TOKENS, block_size=block_size, stop_token_ids=[])
    phases = Phases()
    for prompt in prompts:
        cache, plain_cache = target.new_cache(), target.new_cache()
        row = start_row(target, prompt, drafter, cfg, cache, 0)
        target.forward(torch.tensor(prompt), 0, plain_cache, with_features=False)
        step = 0
        while not row.done(cfg):
            plain_cache_len = row.anchor_pos
            start = time.perf_counter()
            (draft, draft_logits), t_draft = timed(draft_block, row, drafter, cfg)
            ids = torch.cat([row.anchor.view(1), draft])
            out, t_verify = timed(target.forward, ids, row.anchor_pos, cache, True)
            t0 = time.perf_counter()
            accepted = commit_block(row, draft, draft_logits, out.logits, out.features, drafter, cfg) - 1
            crop_cache(cache, row.anchor_pos)
            t_book = time.perf_counter() - t0
            t_step = time.perf_counter() - start
            t_plain = plain_step(target, plain_cache, ids[:1], plain_cache_len)
            target.forward(ids[: accepted + 1], plain_cache_len, plain_cache, with_features=False)  # keep pace
            crop_cache(plain_cache, row.anchor_pos)
            step += 1
            if step > WARMUP_STEPS and draft.numel() == block_size - 1:
                for name, value in (("draft", t_draft), ("verify", t_verify), ("bookkeeping", t_book)):
                    getattr(phases, name).append(value)
                phases.step.append(t_step)
                phases.plain.append(t_plain)
                phases.accepted.append(accepted)
    return phases


def summarise(phases: Phases) -> dict[str, float]:
    plain = statistics.median(phases.plain)
    row = {"plain_ms": 1e3 * plain, "steps": len(phases.step), "tau": 1 + statistics.mean(phases.accepted)}
    for name in ("draft", "verify", "bookkeeping", "step"):
        value = statistics.median(getattr(phases, name))
        row[f"{name}_ms"], row[f"{name}_per_plain"] = 1e3 * value, value / plain
    row["speedup_estimate"] = row["tau"] / row["step_per_plain"]  # tokens per step over steps' cost in plain steps
    return row


def hf_against_ours(model, target: Target, prompts: list[list[int]]) -> dict[str, float]:
    """Seconds per output token, prefill excluded, of HF `generate` (greedy) and of our plain loop."""
    ours, hf = [], []
    for prompt in prompts:
        result = generate(target, prompt, None, DecodeConfig(max_new_tokens=NEW_TOKENS, stop_token_ids=[]))
        ours.append(result.time_per_output_token)
        ids = torch.tensor([prompt])
        kwargs = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}
        _, prefill = timed(model.generate, ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        _, total = timed(model.generate, ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **kwargs)
        hf.append((total - prefill) / (NEW_TOKENS - 1))
    return {"ours_tpot_ms": 1e3 * statistics.median(ours), "hf_generate_tpot_ms": 1e3 * statistics.median(hf)}


def rows_for(cfg: Config, prompts: list[list[int]]) -> tuple[list[dict], dict]:
    block = cfg.draft.block_size or 8
    rows = []
    for layout, pretranspose in LAYOUTS.items():
        model, tokenizer = load_testbed(cfg.target.testbed, dtype=cfg.target.dtype)  # Target re-lays it in place
        target = Target(model, tokenizer, pretranspose=pretranspose)
        drafter = make_drafter(cfg.draft.or_random(), target)
        sizes = range(2, block + 1, 2) if pretranspose else [block]
        for size in sizes:
            rows.append({"layout": layout, "block_size": size, **summarise(measure(target, drafter, prompts, size))})
    model, tokenizer = load_testbed(cfg.target.testbed, dtype=cfg.target.dtype)
    return rows, hf_against_ours(model, Target(model, tokenizer), prompts)


def print_tables(cfg: Config, rows: list[dict], baseline: dict) -> None:
    table = Table(
        title=f"{cfg.name}: one speculative step vs one plain step, {cfg.target.dtype}, {torch.get_num_threads()} "
        f"thread(s), {PROMPTS} GSM8K test prompts x {NEW_TOKENS} tokens (median per step)"
    )
    for col in ("layout", "block", "plain ms", "draft", "verify", "bookkeeping", "step", "tau", "tau / step"):
        table.add_column(col, justify="left" if col == "layout" else "right")
    for r in rows:
        table.add_row(
            r["layout"],
            str(r["block_size"]),
            f"{r['plain_ms']:.1f}",
            *(f"{r[f'{p}_ms']:.1f} ({r[f'{p}_per_plain']:.2f}x)" for p in ("draft", "verify", "bookkeeping", "step")),
            f"{r['tau']:.2f}",
            f"{r['speedup_estimate']:.2f}x",
        )
    console = Console(width=160)
    console.print(table)
    console.print(
        f"plain decoding, time per output token: ours {baseline['ours_tpot_ms']:.1f} ms, "
        f"HF generate {baseline['hf_generate_tpot_ms']:.1f} ms "
        f"(ours / HF = {baseline['ours_tpot_ms'] / baseline['hf_generate_tpot_ms']:.2f})"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cfg = load_config(argv[0] if argv else "configs/smol.yaml", argv[1:])
    if not cfg.target.testbed:
        sys.exit("bench-speedup measures a testbed target (target.testbed=smol or tiny)")
    set_threads(cfg.threads)
    tokenizer = load_testbed(cfg.target.testbed, dtype=cfg.target.dtype)[1]
    convs = load_benchmark("gsm8k", None, PROMPTS)
    prompts = [render_first_turn(tokenizer, c.turns[0], cfg.target.thinking) for c in convs]
    rows, baseline = rows_for(cfg, prompts)
    print_tables(cfg, rows, baseline)
    out = Path("runs/bench-speedup.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "config": cfg.name,
        "dtype": cfg.target.dtype,
        "threads": torch.get_num_threads(),
        "draft": cfg.draft.path,
    }
    out.write_text(json.dumps({**record, "rows": rows, "plain_loop_vs_hf": baseline}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
