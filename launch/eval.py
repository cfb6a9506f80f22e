"""`draft-opd eval CONFIG [key=value ...]`: tau and speedup on benchmarks, as a table and JSON."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from draft_opd.evaluation.protocol import BenchmarkSummary, TurnResult, check_first_turns_fit, run_benchmark
from draft_opd.launch.config import Config, job_main, to_yaml
from draft_opd.prompts.sets import Conversation, load_benchmark
from draft_opd.speculative.decode import DecodeConfig, generate
from draft_opd.speculative.loading import make_drafter
from draft_opd.speculative.runtime import set_threads
from draft_opd.speculative.target import load_target
from draft_opd.speculative.tau import tau_pooled


def load_sets(cfg: Config) -> dict[str, list[Conversation]]:
    return {name: load_benchmark(name, cfg.data.get(name), cfg.eval.num_prompts) for name in cfg.eval.benchmarks}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_table(summaries: list[BenchmarkSummary], title: str) -> Table:
    table = Table(title=title)
    columns = ("benchmark", "prompts", "tau mean", "95% +-", "tau pooled", "speedup", "tok/s spec", "tok/s plain")
    for col in (*columns, "lossless"):
        table.add_column(col, justify="left" if col == "benchmark" else "right")
    for s in summaries:
        table.add_row(
            s.benchmark,
            str(s.prompts),
            _fmt(s.tau_mean, ".2f"),
            _fmt(s.tau_ci95, ".2f"),
            _fmt(s.tau_pooled, ".2f"),
            _fmt(s.speedup, ".2f") + ("x" if s.speedup else ""),
            _fmt(s.tokens_per_s_spec, ".1f"),
            _fmt(s.tokens_per_s_plain, ".1f"),
            "-" if s.lossless is None else str(s.lossless).lower(),
        )
    return table


def run_eval(cfg: Config, console: Console | None = None) -> list[BenchmarkSummary]:
    console = console or Console(stderr=True, soft_wrap=True)
    set_threads(cfg.threads)
    sets = load_sets(cfg)  # read prompt files first: a bad file fails before minutes of model loading
    console.print(f"loading target ({cfg.target.testbed or cfg.target.path}) ...")
    target = load_target(cfg.target)
    drafter = make_drafter(cfg.draft, target)
    decode = DecodeConfig(
        max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature, block_size=None, seed=cfg.draft.seed
    )
    for convs in sets.values():  # a prompt too long for the context fails now, not after minutes of decoding
        check_first_turns_fit(target, drafter, convs, decode, cfg.target.thinking)
    label = f"{drafter.cfg.kind} block {drafter.cfg.block_size}" if drafter else "plain decoding only"
    if cfg.eval.warmup_tokens:
        generate(target, [0, 1, 2], drafter, DecodeConfig(max_new_tokens=cfg.eval.warmup_tokens, stop_token_ids=[]))

    summaries: list[BenchmarkSummary] = []
    turns: dict[str, list[TurnResult]] = {}
    total = cfg.eval.seeds * sum(len(c.turns) for convs in sets.values() for c in convs)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"eval ({label})", total=total, status="")
        for name, convs in sets.items():
            accept_lens: list[list[int]] = []

            def on_turn(result: TurnResult, name: str = name, accept_lens: list[list[int]] = accept_lens) -> None:
                accept_lens.append(result.accept_lens)
                pooled = tau_pooled(accept_lens)
                tau = f"tau {pooled:.2f}" if pooled else "plain"
                progress.update(task, advance=1, status=f"{name}: {tau}, {result.new_tokens} tok")

            summary, turns[name] = run_benchmark(
                target, drafter, name, convs, decode, cfg.target.thinking, on_turn, cfg.eval.seeds
            )
            summaries.append(summary)
    Console(width=140).print(
        summary_table(
            summaries,
            f"{cfg.name}: {label}, T={cfg.eval.temperature} x {cfg.eval.seeds} seeds, "
            f"max_new_tokens={cfg.eval.max_new_tokens}",
        )
    )
    if cfg.eval.out:
        write_report(Path(cfg.eval.out), cfg, summaries, turns)
        console.print(f"report written to {cfg.eval.out}")
    return summaries


def write_report(
    path: Path, cfg: Config, summaries: list[BenchmarkSummary], turns: dict[str, list[TurnResult]]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "config": to_yaml(cfg),
        "summaries": [s.as_dict() for s in summaries],
        "turns": {name: [vars(t) for t in ts] for name, ts in turns.items()},
    }
    path.write_text(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> None:
    job_main(run_eval, "eval", argv)


if __name__ == "__main__":
    main()
