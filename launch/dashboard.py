"""A picture of a run's dashboard: the panels to watch, drawn from RUN_DIR/tensorboard.

`make dashboard` serves the live views (Ray dashboard, Prometheus endpoint, TensorBoard); this
renders the same scalars to one PNG, for the README and for machines without a browser.

    python -m draft_opd.launch.dashboard RUN_DIR [--out RUN_DIR/dashboard.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

PANELS = [  # (title, scalar-tag prefixes, y label)
    ("Rollout tau per actor (rolling)", ("tau/",), "tokens / verify step"),
    ("Acceptance rate by block position", ("acceptance_rate/",), "share of verify steps"),
    ("Held-out tau", ("eval_tau/",), "tokens / verify step"),
    ("Loss terms", ("loss/",), "loss"),
    ("Throughput", ("rollout_tokens_per_s/", "learner_tokens_per_s"), "tokens / s"),
    ("Replay buffer", ("buffer_size",), "trajectories"),
    ("Staleness of sampled rows", ("staleness",), "draft versions"),
    ("Publish latency", ("publish_seconds",), "s"),
]


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def render(run_dir: Path, out: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("drawing the dashboard needs matplotlib: pip install matplotlib") from None
    scalars = read_scalars(run_dir)
    if not scalars:
        raise SystemExit(f"no TensorBoard scalars in {run_dir}/tensorboard: is it a training run directory?")
    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5))
    for ax, (title, prefixes, ylabel) in zip(axes.flat, PANELS):
        tags = [tag for tag in sorted(scalars) if tag.startswith(prefixes)]
        for tag in tags:
            steps, values = zip(*scalars[tag])
            ax.plot(steps, values, label=tag, marker="o" if len(steps) < 8 else None)
        ax.set(title=title, xlabel="learner step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if tags:
            ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"Draft-OPD run {run_dir.name}")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print(render(args.run_dir, args.out or args.run_dir / "dashboard.png"))


if __name__ == "__main__":
    main()
