"""Fault table: inject each fault into a short tiny-target training job and report what happened.

Each row is one job (`python -m draft_opd.launch.train configs/tiny.yaml ...` in its own process, with its own
local Ray cluster) and one real fault:
- rollout actor SIGKILL mid-rollout; learner rank SIGKILL; learner rank SIGSTOP (a hang only a
  timeout can notice): the job recovers in place;
- the whole job SIGKILLed, then run again with resume=auto; the same after flipping a byte of a
  sealed buffer segment.
Columns: detected (a `fault` line in metrics.jsonl, or the resumed job naming the checkpoint or the
skipped segment), recovered (the job finished every step and saved its draft), steps redone (learner
steps done twice because they came after the checkpoint resumed from), trajectories lost (rows that
had reached the buffer's files when the fault struck and were not loaded afterwards: the open
segment of a killed job, a corrupt segment), prompts missing (prompts of the stream, before the
furthest one in the final buffer, that it lacks: 0 means the rows lost to a kill or a corrupt segment
were rolled out again).

    python -m draft_opd.faults.table [--out runs/bench-faults.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.table import Table

from draft_opd.faults.injection import (
    flip_bytes,
    kill_tree,
    loadable_ids,
    segment_ids,
    stream_gaps,
    wait_for,
    worker_pids,
)
from draft_opd.launch.config import load_config
from draft_opd.launch.run_dir import RunDir

STEPS = 40
JOB = [
    "configs/tiny.yaml",
    "train.sft_steps=30",
    "train.opd_steps=10",
    "train.checkpoint_every=10",
    "train.publish_every=5",
    "rollout.num_prompts=8",
    "rollout.max_new_tokens=32",
    "learner.batch_size=16",
    "learner.lr=2e-3",
    "learner.warmup_steps=2",
    "learner.timeout_s=8",
    "train.wait_retries=1",
    "train.eval_benchmark=gsm8k_train",
    "train.eval_prompts=2",
    "train.eval_max_new_tokens=16",
    "buffer.min_size_to_sample=3",
    "buffer.timeout_s=120",
    "buffer.samples_per_insert=16",
    "buffer.ratio_tolerance=64",
]


@dataclass
class Row:
    fault: str
    detected: bool
    recovered: bool
    steps_redone: int
    trajectories_lost: int
    prompts_missing: int
    wall_s: float


def start_job(out_dir: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = (out_dir / "job.log").open("w")  # a pipe could fill up and stall the job
    return subprocess.Popen(
        [sys.executable, "-m", "draft_opd.launch.train", *JOB, f"train.out_dir={out_dir}", *extra],
        env=env,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )


def finish(job: subprocess.Popen, out_dir: Path, timeout_s: float = 600) -> str:
    job.wait(timeout=timeout_s)
    return "".join((out_dir / "job.log").read_text().split())  # undo rich's line wrapping


def after_checkpoint(run_dir: Path, job: subprocess.Popen) -> None:
    run = RunDir(run_dir)
    wait_for(
        lambda: (run.checkpoint(10) / "state.json").exists() and run.last_step() >= 13,
        "step 13, past the checkpoint at step 10",
        running=lambda: job.poll() is None,
    )


def redone(run_dir: Path) -> int:
    steps = [r["step"] for r in RunDir(run_dir).records() if r["phase"] in ("sft", "opd")]
    return len(steps) - len(set(steps))


def completed(run_dir: Path) -> bool:
    run = RunDir(run_dir)
    steps = {r["step"] for r in run.records() if r["phase"] in ("sft", "opd")}
    return run.summary_file.exists() and steps == set(range(1, STEPS + 1)) and run.draft_dir.is_dir()


def prompts_missing(run_dir: Path) -> int:
    return stream_gaps(run_dir, load_config(JOB[0], JOB[1:]))[1]


def in_place(name: str, out_dir: Path, actor_class: str, sig: signal.Signals) -> Row:
    """A fault the running job must survive by itself."""
    run_dir, started = out_dir / "tiny", time.perf_counter()
    job = start_job(out_dir)
    if actor_class == "RolloutWorker":
        wait_for(lambda: RunDir(run_dir).last_step() >= 3, "step 3", running=lambda: job.poll() is None)
    else:
        after_checkpoint(run_dir, job)
    pid = worker_pids(actor_class, job.pid)[0]
    os.kill(pid, sig)
    at_fault = segment_ids(run_dir)
    finish(job, out_dir)
    faults = [r for r in RunDir(run_dir).records() if r["phase"] == "fault"]
    return Row(
        name,
        bool(faults),
        completed(run_dir),
        redone(run_dir),
        len(at_fault - loadable_ids(run_dir)),
        prompts_missing(run_dir),
        time.perf_counter() - started,
    )


def killed_job(name: str, out_dir: Path, corrupt: bool) -> Row:
    """The whole job dies; a second job continues the run with resume=auto."""
    run_dir, started = out_dir / "tiny", time.perf_counter()
    job = start_job(out_dir)
    after_checkpoint(run_dir, job)
    kill_tree(job.pid)
    killed_at, at_fault = RunDir(run_dir).last_step(), segment_ids(run_dir)
    if corrupt:
        flip_bytes(sorted((run_dir / "buffer").glob("seg-*.done"))[0].with_suffix(".arrow"))
    lost = len(at_fault - loadable_ids(run_dir))
    log = finish(start_job(out_dir, "resume=auto"), out_dir)
    detected = "skipped" in log if corrupt else "checkpoints/step-0000010" in log
    return Row(
        name,
        detected,
        completed(run_dir),
        killed_at - 10,
        lost,
        prompts_missing(run_dir),
        time.perf_counter() - started,
    )


SCENARIOS = [
    ("rollout actor SIGKILL mid-rollout", partial(in_place, actor_class="RolloutWorker", sig=signal.SIGKILL)),
    ("learner rank SIGKILL", partial(in_place, actor_class="Learner", sig=signal.SIGKILL)),
    ("learner rank hung (SIGSTOP)", partial(in_place, actor_class="Learner", sig=signal.SIGSTOP)),
    ("whole job SIGKILL, resume=auto", partial(killed_job, corrupt=False)),
    ("job SIGKILL + corrupt segment, resume=auto", partial(killed_job, corrupt=True)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-faults.json")
    args = parser.parse_args()
    console, rows = Console(width=130), []
    for name, scenario in SCENARIOS:
        console.print(f"[bold]{name}[/] ...")
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(scenario(name, Path(tmp)))
        console.print(rows[-1])
    table = Table(title=f"Faults in a {STEPS}-step tiny-target training job (checkpoint every 10 steps)")
    for column in ("fault", "detected", "recovered", "steps redone", "trajectories lost", "prompts missing", "wall s"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r.fault,
            str(r.detected),
            str(r.recovered),
            str(r.steps_redone),
            str(r.trajectories_lost),
            str(r.prompts_missing),
            f"{r.wall_s:.0f}",
        )
    console.print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    console.print(f"saved {args.out}")


if __name__ == "__main__":
    main()
