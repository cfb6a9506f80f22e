"""Acceptance length tau: tokens committed per verify step, the bonus token included (accepted + 1).

The field reports it two ways; both are defined here, once, for rollouts, evaluations and logs:
- `tau_mean`: the mean over sequences (turns) of each sequence's mean tau, as DFlash's benchmark.py;
- `tau_pooled`: all tokens committed by verify steps over all verify steps, as SpecForge;
- `tau_interval`: the half width of tau_mean's 95 % confidence interval over its sequences (at T > 0 a
  sequence is one prompt at one sampling seed), the normal approximation.
Each takes the accept lengths of every verify step, one list per sequence. A sequence without a
verify step (it stopped on the prefill's token) carries no acceptance and is left out; with none
left the answer is None.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence


def tau_mean(accept_lens: Iterable[Sequence[int]]) -> float | None:
    means = [statistics.fmean(accept_len) + 1 for accept_len in accept_lens if accept_len]
    return statistics.fmean(means) if means else None


def tau_pooled(accept_lens: Iterable[Sequence[int]]) -> float | None:
    steps = [a for accept_len in accept_lens for a in accept_len]
    return statistics.fmean(steps) + 1 if steps else None


def tau_interval(accept_lens: Iterable[Sequence[int]]) -> float | None:
    means = [statistics.fmean(accept_len) + 1 for accept_len in accept_lens if accept_len]
    return 1.96 * statistics.stdev(means) / len(means) ** 0.5 if len(means) > 1 else None
