"""A private local cluster's workers write their output to the run's log, not to the driver's terminal.

Real Ray: a subprocess driver starts a local cluster with the job's runtime env, and its worker prints
through Python and through the raw file descriptors (as C++ libraries and progress bars do).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from draft_opd.launch.train import ALLOCATOR_ENV, worker_env

DRIVER = textwrap.dedent(
    """
    import os, sys, ray
    from pathlib import Path
    from draft_opd.launch import worker_log
    from draft_opd.launch.train import worker_env

    @ray.remote
    def noisy():
        print("PROBE python stdout", flush=True)
        os.write(2, b"PROBE fd 2\\n")
        return os.getpid(), os.environ.get("MALLOC_MMAP_THRESHOLD_")

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=True,
             runtime_env=worker_log.runtime_env(Path(sys.argv[1]), worker_env()))
    pid, threshold = ray.get(noisy.remote())
    print("worker pid", pid, "mmap threshold", threshold, flush=True)
    ray.shutdown()
    """
)


def test_worker_output_goes_to_the_log_file_and_not_to_the_driver(tmp_path):
    log = tmp_path / "workers.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.run(
        [sys.executable, "-c", DRIVER, str(log)], capture_output=True, text=True, timeout=120, env=env
    )
    assert driver.returncode == 0, driver.stderr[-2000:]
    assert "worker pid" in driver.stdout
    assert f"mmap threshold {ALLOCATOR_ENV['MALLOC_MMAP_THRESHOLD_']}" in driver.stdout  # the allocator setting
    assert "PROBE" not in driver.stdout + driver.stderr, driver.stdout + driver.stderr
    written = log.read_text()
    assert "PROBE python stdout" in written and "PROBE fd 2" in written, written


def test_the_workers_allocator_settings_keep_the_callers_own(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1024")
    assert worker_env() == {
        "MALLOC_MMAP_THRESHOLD_": ALLOCATOR_ENV["MALLOC_MMAP_THRESHOLD_"],
        "MALLOC_TRIM_THRESHOLD_": "1024",
    }
