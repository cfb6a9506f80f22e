"""Where a training run reports: metrics.jsonl, TensorBoard scalars, and Ray metrics (Prometheus).

One call, `Telemetry.scalar`, feeds both live views: a `ray.util.metrics.Gauge` (exported by the
node's metrics agent as `ray_draft_opd_<name>` on the cluster's Prometheus endpoint, which the
Ray dashboard and Grafana read) and a TensorBoard scalar `<name>[/<tag>...]` in RUN_DIR/tensorboard.
metrics.jsonl keeps the full record of every step for scripts.
"""

from __future__ import annotations

import json
from pathlib import Path

from ray.util.metrics import Gauge

# name -> (description, tag keys besides "run")
GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "tau": ("Rolling acceptance length (tokens committed per verify step) of a rollout actor", ("actor",)),
    "acceptance_rate": (
        "Rolling share of verify steps that accept the draft token at this block position",
        ("position",),
    ),
    "eval_tau": ("Held-out acceptance length of the latest draft, per benchmark", ("benchmark",)),
    "rollout_tokens_per_s": ("Generated tokens per second of a rollout actor", ("actor",)),
    "learner_tokens_per_s": ("Trained tokens per second, all learner ranks", ()),
    "loss": ("Learner loss terms", ("term",)),
    "buffer_size": ("Trajectories in the replay buffer", ()),
    "staleness": ("Mean learner version minus the draft version that generated the sampled rows", ()),
    "publish_seconds": ("Latency of the latest weight publication (gather + put)", ()),
    "draft_version": ("Draft version published to the rollout actors", ()),
    "step": ("Learner steps done", ()),
}


class Telemetry:
    """Owned by the job driver; every value comes from actor results it already collects."""

    def __init__(self, run_dir: Path, run_name: str, purge_step: int = 0):
        """`purge_step`: a resumed run drops TensorBoard events from this step on (they are logged again)."""
        from torch.utils.tensorboard import SummaryWriter

        self.run_name = run_name
        self.file = (run_dir / "metrics.jsonl").open("a")
        self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step or None)
        self.gauges = {
            name: Gauge(f"draft_opd_{name}", description, tag_keys=("run", *tags))
            for name, (description, tags) in GAUGES.items()
        }

    def log(self, record: dict) -> None:
        """One metrics.jsonl line, flushed at once so a crash loses nothing logged."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def scalar(self, name: str, value: float | None, step: int, **tags: str) -> None:
        if value is None:
            return
        self.gauges[name].set(float(value), tags={"run": self.run_name, **tags})
        self.tensorboard.add_scalar("/".join([name, *tags.values()]), float(value), step)

    def close(self) -> None:
        self.file.close()
        self.tensorboard.close()
