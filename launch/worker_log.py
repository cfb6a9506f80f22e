"""Where the workers' output goes on a private local cluster: one log file in the run directory.

Every rollout actor and learner rank loads weights (transformers draws a bar per load) and starts
DeepSpeed (which warns about the CPU accelerator); forwarded to the terminal, that buries the one
progress line of the job. On a cluster (`ray job submit`) Ray keeps each worker's log itself.
"""

from __future__ import annotations

import os
from pathlib import Path

LOG_ENV = "DRAFT_OPD_WORKER_LOG"
SETUP_HOOK = "draft_opd.launch.worker_log.redirect_to_log"


def redirect_to_log() -> None:
    """Ray's `worker_process_setup_hook`: this worker's stdout and stderr, Python's and C's alike, append to
    the file that $DRAFT_OPD_WORKER_LOG names."""
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def runtime_env(log_file: Path, env_vars: dict[str, str] | None = None) -> dict:
    """The job-wide runtime env that sends every worker's output to `log_file`, with `env_vars` set too."""
    return {"worker_process_setup_hook": SETUP_HOOK, "env_vars": {**(env_vars or {}), LOG_ENV: str(log_file.resolve())}}
