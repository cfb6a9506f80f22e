"""Real faults for training runs: find Ray worker processes by title, kill or freeze them, corrupt files,
and read what a run directory says happened. Shared by `make bench-faults` and tests/test_faults.py."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import psutil

from draft_opd.actors.prompts import PromptPool, load_prompts
from draft_opd.actors.requests import trajectory_id
from draft_opd.buffer import BufferConfig, ReplayBuffer
from draft_opd.launch.config import Config
from draft_opd.launch.run_dir import RunDir


def worker_pids(actor_class: str, root_pid: int) -> list[int]:
    """Actor processes of the Ray cluster that `root_pid` started (the job's driver): Ray titles them
    `ray::<Class>[.<method>]`, and its raylet, their parent, is the driver's child."""
    found = []
    for process in psutil.Process(root_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cmdline = process.cmdline()
            if cmdline and cmdline[0].startswith(f"ray::{actor_class}"):
                found.append(process.pid)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started (a job's driver, its local Ray cluster, the workers)."""
    tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for process in tree:
        process.kill()
    psutil.wait_procs(tree, timeout=30)


def wait_for(condition: Callable[[], bool], what: str, running: Callable[[], bool], timeout_s: float = 300.0) -> None:
    """Poll `condition`; fail at once when the run it waits on is no longer `running`, never only at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if not running():
            raise RuntimeError(f"the run ended before {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.2)


def segment_ids(run_dir: Path) -> set[str]:
    """traj_ids of every row that reached the buffer's files, sealed or not (a torn last batch is ignored)."""
    import pyarrow as pa

    ids: set[str] = set()
    for data in RunDir(run_dir).buffer_dir.glob("seg-*.arrow"):
        try:
            with pa.OSFile(str(data)) as source:
                for batch in pa.ipc.open_stream(source):
                    ids.update(batch.column("traj_id").to_pylist())
        except (pa.ArrowInvalid, OSError):
            pass
    return ids


def loadable_ids(run_dir: Path) -> set[str]:
    """traj_ids a reopened buffer loads (sound sealed segments only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ReplayBuffer(BufferConfig(dir=str(RunDir(run_dir).buffer_dir))) as buffer:
            return set(buffer.traj_ids())


def stream_gaps(run_dir: Path, cfg: Config) -> tuple[int, int]:
    """(trajectories in the buffer on disk, prompts of the stream before the furthest one held that are missing).

    With one rollout actor and no lost rows the buffer holds exactly a prefix of its prompt stream;
    a gap is a prompt skipped. (A prompt rolled out twice cannot show here: inserts are idempotent.)
    """
    held = loadable_ids(run_dir)
    pool, missing, found = PromptPool(load_prompts(cfg.rollout.prompts, cfg.rollout.num_prompts)), 0, 0
    while found < len(held):
        if trajectory_id(*pool.next()) in held:
            found += 1
        else:
            missing += 1
        if pool.position > 100 * (len(held) + 1):
            raise ValueError(f"{run_dir}: the buffer holds trajectories that are not in the prompt stream")
    return len(held), missing


def flip_bytes(path: Path, offset_from_end: int = 64) -> None:
    """Corrupt a file in place, as a bad disk sector would."""
    data = bytearray(path.read_bytes())
    at = max(len(data) - offset_from_end, 0)
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
