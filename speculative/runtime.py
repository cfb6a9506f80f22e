"""Process-wide torch settings that every role (rollout actor, learner rank, evaluation) applies the same way."""

from __future__ import annotations

import torch


def set_threads(n: int) -> None:
    """torch's intra-op threads for this process; 0 keeps torch's default (one per core).

    Several roles share one machine's cores (two rollout actors and a learner on 2 cores), so each role's
    config states its own count, and this is the one place that applies it."""
    if n > 0:
        torch.set_num_threads(n)
