"""A run directory, `train.out_dir/name`: the one place a training run lives, for the job, export and the fault tools.

    config.yaml      the resolved config
    metrics.jsonl    one line per learner step, evaluation and fault
    tensorboard/     the same scalars for TensorBoard
    buffer/          the replay buffer's sealed Arrow segments
    checkpoints/step-NNNNNNN/{learner/, state.json}
    draft/           the final draft (config.json + model.safetensors)
    workers.log      the output of a private local cluster's workers (weight loading, library warnings)
    summary.json     written last: the run finished

A checkpoint's `learner/` is DeepSpeed's own (weights, optimizer, scheduler, every rank's ZeRO
shards); `state.json` holds what the driver needs to continue and is written last, so a
checkpoint without it is incomplete and ignored. The buffer's rows are not copied: saving a
checkpoint seals the buffer's open segment, so every trajectory inserted so far is on disk.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

STATE = "state.json"


@dataclass
class RunState:
    step: int  # learner steps done
    version: int  # draft version published last
    positions: list[int]  # prompts taken by each rollout actor
    buffer: dict  # ReplayBuffer.state_dict()
    tau_before: float | None = None  # held-out tau of the initial draft


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def buffer_dir(self) -> Path:
        return self.path / "buffer"

    @property
    def draft_dir(self) -> Path:
        return self.path / "draft"

    @property
    def worker_log(self) -> Path:
        return self.path / "workers.log"

    @property
    def checkpoint_root(self) -> Path:
        return self.path / "checkpoints"

    # --- metrics --------------------------------------------------------------------------

    def records(self) -> list[dict]:
        """metrics.jsonl as dicts; none before the run logged anything."""
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    def last_step(self) -> int:
        return max((r["step"] for r in self.records() if r["phase"] in ("sft", "opd")), default=0)

    def keep_records_until(self, step: int) -> None:
        """Drop metrics lines logged after `step`: a resumed run logs those steps again. Faults stay."""
        if self.metrics_file.exists():
            kept = [r for r in self.records() if r["phase"] == "fault" or r.get("step", -1) <= step]
            self.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def summary(self) -> dict | None:
        return json.loads(self.summary_file.read_text()) if self.summary_file.exists() else None

    def write_summary(self, summary: dict) -> None:
        self.summary_file.write_text(json.dumps(summary, indent=2))

    def earlier_run(self) -> list[str]:
        """What an earlier run left here (empty for a fresh directory)."""
        return [p.name for p in (self.metrics_file, self.checkpoint_root, self.summary_file) if p.exists()]

    # --- checkpoints ----------------------------------------------------------------------

    def checkpoint(self, step: int) -> Path:
        return self.checkpoint_root / f"step-{step:07d}"

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoints whose state.json was written, oldest first."""
        if not self.checkpoint_root.is_dir():
            return []
        return sorted(d for d in self.checkpoint_root.glob("step-*") if (d / STATE).is_file())

    def latest_checkpoint(self) -> Path | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def rotate(self, keep: int) -> None:
        """Keep the newest `keep` complete checkpoints; drop older ones and incomplete leftovers."""
        done = self.complete_checkpoints()
        newest = done[-1] if done else None
        for old in done[:-keep] if keep > 0 else done:
            shutil.rmtree(old, ignore_errors=True)
        for leftover in self.checkpoint_root.glob("step-*"):
            if not (leftover / STATE).is_file() and newest is not None and leftover.name < newest.name:
                shutil.rmtree(leftover, ignore_errors=True)


def step_records(records: list[dict]) -> dict[int, dict]:
    """The training step records of metrics.jsonl by step; where a resume logged a step again, its last line wins."""
    return {r["step"]: r for r in records if r.get("phase") in ("sft", "opd")}


def training_seconds(records: list[dict]) -> dict[int, float]:
    """Seconds spent training up to and including each step: each step's own step_s added, so the pause between
    an interruption and its resume does not count."""
    total, out = 0.0, {}
    for step, record in sorted(step_records(records).items()):
        total += record.get("step_s", 0.0)
        out[step] = total
    return out


def write_state(directory: Path, state: RunState) -> None:
    tmp = directory / (STATE + ".tmp")
    tmp.write_text(json.dumps(asdict(state)))
    tmp.replace(directory / STATE)  # atomic: the checkpoint is complete from here on


def read_state(directory: Path) -> RunState:
    try:
        return RunState(**json.loads((directory / STATE).read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(
            f"checkpoint {directory} has an unreadable {STATE} ({err}); "
            f"delete {directory} to resume from the one before it"
        ) from None
