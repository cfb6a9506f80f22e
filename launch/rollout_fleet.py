"""The rollout actors of a run as one object: their placement, prompt positions, restarts, calls in flight,
the draft they hold, and their rolling statistics.

Actors roll out continuously: `harvest` collects finished calls and starts the next ones, never
blocking on anything else. An actor that dies is restarted by Ray (max_restarts=-1); its failed
call is reported, and once it answers it gets its prompt position (past what the buffer already
holds) and the current draft. Its unfinished trajectory never reached the buffer (inserts are whole rows).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable

import ray
from ray.util.placement_group import remove_placement_group

from draft_opd.actors.rollout import start_rollout_actors
from draft_opd.launch.config import Config

Fault = Callable[..., None]  # fault(kind, **details): how the job records a fault


class RolloutFleet:
    def __init__(
        self,
        cfg: Config,
        buffer: str,
        positions: list[int] | None,
        version: int,
        on_fault: Fault,
        rolling: bool = True,
    ):
        """`buffer`: the name of the buffer actor the actors write to. `rolling=False`: the actors only evaluate
        (offline SFT) until `start_rolling`."""
        self.cfg, self.buffer, self.on_fault, self.rolling = cfg, ray.get_actor(buffer), on_fault, rolling
        self.actors, self.group = start_rollout_actors(cfg.target, cfg.draft, cfg.rollout, buffer)
        self.positions = list(positions) if positions else [0] * len(self.actors)
        self.version, self.weights = version, None  # the draft handed out last (None: the initial one)
        self.taus = [deque(maxlen=8) for _ in self.actors]  # per actor, over its last rollout calls
        self.tokens_per_s = [0.0] * len(self.actors)
        self.counts = {"rollout_tokens": 0, "verify_steps": 0}  # target work harvested since take_counts
        self.acceptance: deque[list[float]] = deque(maxlen=16)
        self.pending: dict[ray.ObjectRef, tuple[int, str]] = {}  # actor calls in flight
        self.idle: set[int] = set()  # restored actors waiting for start_rolling
        for i in range(len(self.actors)):
            self.restore(i)  # then it rolls out

    def restore(self, i: int) -> None:
        """Continue actor i's prompt stream at its position, past prompts the buffer already holds.
        The buffer's ids go to the actor as an object ref: the driver does not wait for them."""
        self.pending[self.actors[i].restore.remote(self.positions[i], self.buffer.traj_ids.remote())] = (i, "restore")

    def harvest(self) -> None:
        """Collect finished calls and start each actor's next rollout; never blocks (the caller's wait does)."""
        if not self.pending:  # offline SFT: nothing in flight
            return
        ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
        for ref in ready:
            i, call = self.pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                if call == "run":
                    self.on_fault("rollout actor died", actor=f"rollout-{i}", error=str(err).splitlines()[0])
                else:
                    time.sleep(0.5)  # still restarting
                self.restore(i)
                continue
            if call == "run":
                self.positions[i] = result["prompt_position"]
                if result["tau"] is not None:  # None: no verify step in this call
                    self.taus[i].append(result["tau"])
                self.tokens_per_s[i] = result["tokens_per_s"]
                self.counts["rollout_tokens"] += result["tokens"]
                self.counts["verify_steps"] += result["verify_steps"]
                self.acceptance.append(result["acceptance_by_position"])
            elif self.weights is not None:  # restored: the current draft before it rolls out again
                self.actors[i].set_draft.remote(self.version, self.weights)
            if self.rolling:
                self.roll(i)
            else:
                self.idle.add(i)

    def take_counts(self) -> dict[str, int]:
        """Tokens the rollouts committed and target verify passes they ran since the last call (a step's share)."""
        counts, self.counts = self.counts, dict.fromkeys(self.counts, 0)
        return counts

    def roll(self, i: int) -> None:
        self.pending[self.actors[i].run.remote(self.cfg.train.rollouts_per_call)] = (i, "run")

    def start_rolling(self) -> None:
        """From now on every actor rolls out continuously."""
        self.rolling = True
        for i in sorted(self.idle):
            self.roll(i)
        self.idle.clear()

    def shutdown(self) -> None:
        """The actors killed and their CPUs given back: the next job in this process (a study) gets them."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.group)

    def set_draft(self, version: int, weights: dict) -> None:
        """Put the weights once in the object store; every actor applies them between rollouts."""
        self.version, self.weights = version, ray.put(weights)
        for actor in self.actors:
            actor.set_draft.remote(version, self.weights)

    def evaluate(self) -> ray.ObjectRef:
        """Held-out tau on actor 0, queued behind its calls (so after a set_draft), with the version it holds."""
        t = self.cfg.train
        return self.actors[0].evaluate_tau.remote(
            t.eval_benchmark, t.eval_prompts, t.eval_max_new_tokens, self.cfg.data.get(t.eval_benchmark)
        )

    def tau(self) -> float | None:
        """Mean over actors of their rolling tau; None before any rollout finished."""
        taus = [statistics.fmean(t) for t in self.taus if t]
        return statistics.fmean(taus) if taus else None

    def report(self, scalar: Callable[..., None], step: int) -> None:
        """Per-actor tau and throughput, and acceptance by block position, as live scalars."""
        for i, taus in enumerate(self.taus):
            if taus:
                scalar("tau", statistics.fmean(taus), step, actor=f"rollout-{i}")
                scalar("rollout_tokens_per_s", self.tokens_per_s[i], step, actor=f"rollout-{i}")
        if self.acceptance:
            width = min(map(len, self.acceptance))
            for j in range(width):
                scalar("acceptance_rate", statistics.fmean(a[j] for a in self.acceptance), step, position=str(j + 1))
