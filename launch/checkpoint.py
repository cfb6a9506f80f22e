"""Checkpoints of a training run: RUN_DIR/checkpoints/step-NNNNNNN/{learner/, state.json}.

`learner/` is DeepSpeed's own checkpoint (weights, optimizer, scheduler; every rank writes its
ZeRO shards). `state.json` holds what the driver needs to continue: the step, the draft version,
each rollout actor's position in its prompt stream and the buffer's counters. It is written last,
so a checkpoint without it is incomplete and ignored. The buffer's rows are not copied: saving a
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


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f"step-{step:07d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints whose state.json was written, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(d for d in root.glob("step-*") if (d / STATE).is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def write_state(directory: Path, state: RunState) -> None:
    tmp = directory / (STATE + ".tmp")
    tmp.write_text(json.dumps(asdict(state)))
    tmp.replace(directory / STATE)  # atomic: the checkpoint is complete from here on


def read_state(directory: Path) -> RunState:
    try:
        return RunState(**json.loads((directory / STATE).read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"checkpoint {directory} has an unreadable {STATE} ({err}); "
                         f"delete {directory} to resume from the one before it") from None


def rotate(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and incomplete leftovers."""
    done = complete_checkpoints(run_dir)
    newest = done[-1] if done else None
    for old in done[:-keep] if keep > 0 else done:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in checkpoint_root(run_dir).glob("step-*"):
        if not (leftover / STATE).is_file() and newest is not None and leftover.name < newest.name:
            shutil.rmtree(leftover, ignore_errors=True)
