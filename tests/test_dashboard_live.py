"""The live dashboard as a user reads it: TensorBoard's HTTP API serves a run's tau while the run writes it.

No browser is needed: the test reads the same JSON routes that TensorBoard's web page draws its charts from.
"""

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from draft_opd.launch.config import load_config
from draft_opd.learner.engine import free_port
from tests.test_train import SHORT_RUN

RUN = "tiny/tensorboard"  # TensorBoard's run name: the event folder relative to --logdir
TAU = "tau/rollout-0"  # tiny has one rollout actor


def get_json(base: str, route: str, **query: str):
    url = f"{base}/data/plugin/scalars/{route}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def tau_points(base: str) -> list[tuple[float, int, float]]:
    """[(wall_time, step, value)] of the tau scalar as TensorBoard serves it now; [] while it has none."""
    if TAU not in get_json(base, "tags").get(RUN, {}):
        return []
    return [tuple(p) for p in get_json(base, "scalars", run=RUN, tag=TAU, format="json")]


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no output)"


def stop(process: subprocess.Popen, first: int, grace_s: float) -> None:
    """`first` to the process, then SIGKILL to its session (it was started in a new one) if it lingers."""
    if process.poll() is None:
        process.send_signal(first)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.mark.slow
def test_tensorboard_serves_tau_while_the_run_writes_it(tmp_path):
    cfg = load_config("configs/tiny.yaml", SHORT_RUN)
    block_size, steps = cfg.draft.block_size, cfg.train.sft_steps + cfg.train.opd_steps
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the job starts its own local Ray
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    tb_log, job_log = tmp_path / "tensorboard.log", tmp_path / "job.log"
    out_dir = tmp_path / "runs"
    out_dir.mkdir()
    tensorboard = job = None
    try:
        with tb_log.open("w") as log:
            tensorboard = subprocess.Popen(
                [bin_dir / "tensorboard", "--logdir", out_dir, "--host", "127.0.0.1", "--port", str(port)]
                + ["--reload_interval", "1"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while True:  # up before the job, so it sees the run from its first event
            assert tensorboard.poll() is None, f"tensorboard exited {tensorboard.returncode}:\n{tail(tb_log)}"
            try:
                get_json(base, "tags")
                break
            except (OSError, urllib.error.URLError):
                assert time.monotonic() < deadline, f"tensorboard not answering on {base} after 60 s:\n{tail(tb_log)}"
                time.sleep(0.5)

        with job_log.open("w") as log:
            job = subprocess.Popen(
                [sys.executable, "-m", "draft_opd.launch.train", "configs/tiny.yaml", *SHORT_RUN]
                + [f"train.out_dir={out_dir}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + 150
        live: list[tuple[float, int, float]] = []
        while not live:  # the first tau points, read back while the job still runs
            assert job.poll() is None, (
                f"the job ended (exit {job.returncode}) before TensorBoard served any {TAU} point:\n"
                f"{tail(job_log)}\n{tail(tb_log)}"
            )
            assert time.monotonic() < deadline, (
                f"no {TAU} point in TensorBoard after 150 s of the job:\n{tail(job_log)}\n{tail(tb_log)}"
            )
            live = tau_points(base)
            time.sleep(0.5)
        assert job.poll() is None, "the job must still run when its first tau points are served"
        for _, step, value in live:
            assert math.isfinite(value) and 1.0 <= value <= block_size, live
            assert 1 <= step <= steps, live
        assert live[-1][1] < steps, f"TensorBoard showed tau only once the run had written all of it: {live}"

        try:
            job.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job did not finish within 150 s:\n{tail(job_log)}")
        assert job.returncode == 0, tail(job_log)

        records = [json.loads(line) for line in (out_dir / "tiny" / "metrics.jsonl").read_text().splitlines()]
        logged = {r["step"]: r["tau"] for r in records if r["phase"] in ("sft", "opd") and r.get("tau") is not None}
        assert max(logged) == steps, sorted(logged)
        deadline = time.monotonic() + 30
        while (final := tau_points(base))[-1][1] < steps:  # the last events, one reload later
            assert time.monotonic() < deadline, f"TensorBoard stuck at step {final[-1][1]} of {steps}"
            time.sleep(0.5)
        assert len(final) > len(live), (live, final)
        assert [step for _, step, _ in final] == sorted(logged), "one tau point per step that logged a tau"
        for _, step, value in final:  # one rollout actor: its tau is the run's tau of metrics.jsonl
            assert value == pytest.approx(logged[step], rel=1e-5), (step, value, logged[step])
            assert 1.0 <= value <= block_size
        step_points = get_json(base, "scalars", run=RUN, tag="step", format="json")
        assert [step for _, step, _ in step_points] == list(range(1, steps + 1))
    finally:
        if job is not None:
            stop(job, signal.SIGINT, grace_s=30)  # SIGINT: the driver shuts its local Ray down on exit
            with contextlib.suppress(ProcessLookupError):  # any Ray process the driver left in its session
                os.killpg(job.pid, signal.SIGKILL)
        if tensorboard is not None:
            stop(tensorboard, signal.SIGTERM, grace_s=10)
