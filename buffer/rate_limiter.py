"""Keeps the learner and the rollout actors in step, like DeepMind Reverb's SampleToInsertRatio.

Samples are counted in items (blocks); `samples_per_insert` is sampled items per inserted
trajectory. Let diff = inserted * samples_per_insert - sampled. Once `min_size_to_sample`
trajectories are stored, diff must stay inside offset ± ratio_tolerance, where
offset = samples_per_insert * min_size_to_sample: an insert waits while it would push diff above
the window (the learner is behind), a sample of n waits while it would push diff below it
(the actors are behind). Before the minimum size inserts are free and samples wait.

Deadlock freedom: if both sides were blocked at once, diff + samples_per_insert > offset + tol
and diff - n < offset - tol, which needs 2 * tol < samples_per_insert + n. The configuration and
each sample size are checked against that, so one side can always proceed.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable


class RateLimitTimeout(TimeoutError):
    """A blocked insert or sample waited longer than its timeout."""


class RateLimiter:
    """The counters and the admission rules; callers hold the lock of the condition they wait on."""

    def __init__(
        self, capacity: int, min_size_to_sample: int, samples_per_insert: float | None, ratio_tolerance: float
    ):
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be at least 1")
        if not 1 <= min_size_to_sample <= capacity:
            raise ValueError(
                f"min_size_to_sample={min_size_to_sample} must be in 1..capacity={capacity}, "
                "otherwise sampling can never start; lower min_size_to_sample or raise capacity"
            )
        if samples_per_insert is not None:
            if samples_per_insert <= 0:
                raise ValueError(f"samples_per_insert={samples_per_insert} must be positive (None: no ratio limit)")
            if 2 * ratio_tolerance < samples_per_insert + 1:
                raise ValueError(
                    f"ratio_tolerance={ratio_tolerance} is too small for "
                    f"samples_per_insert={samples_per_insert}: "
                    "inserts and samples could block each other forever; set ratio_tolerance >= "
                    f"(samples_per_insert + batch_size) / 2, i.e. at least {(samples_per_insert + 1) / 2}"
                )
        self.min_size_to_sample = min_size_to_sample
        self.samples_per_insert = samples_per_insert
        self.ratio_tolerance = ratio_tolerance
        self.inserted = 0
        self.sampled = 0

    def check_sample_size(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"batch_size={n} must be at least 1")
        if self.samples_per_insert is not None and 2 * self.ratio_tolerance < self.samples_per_insert + n:
            raise ValueError(
                f"batch_size={n} can never fit the sample-to-insert window: "
                "raise ratio_tolerance to at least "
                f"{(self.samples_per_insert + n) / 2} or sample fewer items per call"
            )

    def insert_room(self, size: int) -> int:
        """Rows insertable now: those filling up to the minimum size, or those keeping diff in the window."""
        if self.samples_per_insert is None:
            return sys.maxsize
        ceiling = self._offset() + self.ratio_tolerance + self.sampled  # inserted * spi may not exceed it
        by_ratio = math.floor(ceiling / self.samples_per_insert) - self.inserted
        return max(self.min_size_to_sample - size, by_ratio, 0)

    def can_sample(self, size: int, n: int) -> bool:
        if size < self.min_size_to_sample:
            return False
        return self.samples_per_insert is None or self._diff(n) >= self._offset() - self.ratio_tolerance

    def insert_blocked_reason(self) -> str:
        return (
            f"the learner is behind: inserted={self.inserted}, sampled={self.sampled} items, "
            f"samples_per_insert={self.samples_per_insert}, ratio_tolerance={self.ratio_tolerance}"
        )

    def sample_blocked_reason(self, size: int) -> str:
        if size < self.min_size_to_sample:
            return f"only {size} of min_size_to_sample={self.min_size_to_sample} trajectories stored"
        return (
            f"the actors are behind: inserted={self.inserted}, sampled={self.sampled} items, "
            f"samples_per_insert={self.samples_per_insert}, ratio_tolerance={self.ratio_tolerance}"
        )

    def _diff(self, samples: int) -> float:
        return self.inserted * self.samples_per_insert - (self.sampled + samples)

    def _offset(self) -> float:
        return self.samples_per_insert * self.min_size_to_sample


def wait_or_raise(
    cond: threading.Condition, ready: Callable[[], bool], timeout_s: float | None, what: str, reason: Callable[[], str]
) -> None:
    """Wait on `cond` (held by the caller) until `ready()`; on timeout say what blocked and how to unblock it."""
    start = time.monotonic()
    if not cond.wait_for(ready, timeout_s):
        raise RateLimitTimeout(
            f"{what} gave up after {time.monotonic() - start:.2f} s (timeout_s={timeout_s}): "
            f"{reason()}. "
            "Check that the other side is running, or raise timeout_s / widen ratio_tolerance."
        )
