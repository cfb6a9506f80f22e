"""What a long job shows while it runs: phase, step/total, rolling tau, ETA; and how it never waits forever.

On a terminal the step line is a live rich bar; in a log (`make run > log`, CI, `ray job logs`) it
is a plain line at most every `every_s` seconds and at each phase change, since a live bar
prints nothing until it ends there. Every wait of the job driver goes through `wait_all`,
which gives up at a deadline with a `StageTimeout` naming what it waited for.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class StageTimeout(TimeoutError):
    """A stage of a job waited past its deadline; the job stops with this message instead of hanging."""


def wait_all(
    refs: list,
    what: str,
    timeout_s: float,
    key: str,
    while_waiting: Callable[[], None] = lambda: None,
    poll_s: float = 0.2,
) -> list:
    """All results of `refs`, calling `while_waiting` (work that must not block) every `poll_s` meanwhile;
    `key` is the setting that sets the deadline. The wait itself blocks in ray.wait, so it returns the moment
    the last result lands: a sleep between polls would round every learner step up to its interval."""
    deadline = time.monotonic() + timeout_s
    while len(ray.wait(refs, num_returns=len(refs), timeout=poll_s)[0]) < len(refs):
        if time.monotonic() > deadline:
            raise StageTimeout(
                f"{what}: not done after {key}={timeout_s:g} s; check the actors' logs "
                f"(`ray logs` or /tmp/ray/session_latest/logs), or raise {key}"
            )
        while_waiting()
    return ray.get(refs)


def eta(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class StepProgress:
    """Steps of one invocation (learner steps; prompts for `generate`): a live bar on a terminal, plain
    periodic lines elsewhere."""

    def __init__(
        self, console: Console, total: int, done: int, every_s: float = 30.0, label: str = "train", unit: str = "step"
    ):
        self.console, self.total, self.every_s, self.label, self.unit = console, total, every_s, label, unit
        self.origin: tuple[int, float] | None = None  # the first update: start-up is not a step's cost
        self.last_line, self.last_phase = 0.0, None
        self.bar: Progress | None = None
        if console.is_terminal:
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=console,
            )
            self.task = self.bar.add_task(label, total=total, completed=done, status="")

    def __enter__(self) -> StepProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, step: int, phase: str | None = None, status: str = "") -> None:
        if self.bar is not None:
            self.bar.update(
                self.task,
                completed=step,
                status=status,
                **({"description": f"{self.label} [{phase}]"} if phase else {}),
            )
            return
        now = time.monotonic()
        self.origin = self.origin or (step, now)
        if phase == self.last_phase and step < self.total and now - self.last_line < self.every_s:
            return
        self.last_line, self.last_phase = now, phase
        where = f" [{phase}]" if phase else ""
        self.console.print(
            f"{self.unit} {step}/{self.total}{where} {status}  {self.remaining(step, now)}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )

    def remaining(self, step: int, now: float) -> str:
        first_step, first_time = self.origin or (step, now)
        if step <= first_step:
            return "ETA -"
        return f"ETA {eta((now - first_time) / (step - first_step) * (self.total - step))}"
