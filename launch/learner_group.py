"""The learner ranks of a run as one object, after OpenRLHF's RayActorGroup.

It places the ranks in one placement group, lets rank 0's node choose the rendezvous (its
address and a free port there: the driver may sit on another node), calls every rank with a
deadline and retries, and replaces all ranks together after a fault (a collective cannot go on
without the lost rank). Each rank gets `LOCAL_RANK=0`, since Ray shows it only its own GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from rich.console import Console

from draft_opd.buffer import RateLimitTimeout
from draft_opd.launch.config import Config, one_line
from draft_opd.launch.progress import StageTimeout, wait_all
from draft_opd.learner.engine import LearnerActor, rendezvous


class LearnerFault(RuntimeError):
    """A learner rank died, raised, or hung past its retries."""


def starved(err: BaseException | None) -> bool:
    """The learner's sample timed out: the rollout side produced nothing, which replacing learners cannot fix."""
    while err is not None:
        if isinstance(err, (RateLimitTimeout, ray.exceptions.GetTimeoutError)):
            return True
        err = getattr(err, "cause", None) or err.__cause__
    return False


class LearnerGroup:
    def __init__(self, cfg: Config, buffer, console: Console):
        self.cfg, self.buffer, self.console = cfg, buffer, console
        learner = cfg.learner
        if learner.world_size < 1:
            raise ValueError(f"learner.world_size must be >= 1 (got {learner.world_size})")
        bundle = {"CPU": learner.num_cpus, **({"GPU": learner.num_gpus} if learner.num_gpus else {})}
        self.group = placement_group([bundle] * learner.world_size, strategy="PACK")
        wait_all(
            [self.group.ready()],
            f"placing {learner.world_size} learner rank(s) ({bundle} each)",
            cfg.train.stage_timeout_s,
            "train.stage_timeout_s",
        )
        self.restarts = 0
        self.offline = False  # sampling from an offline corpus instead of `buffer`
        self.ranks = self.start_ranks()

    def in_bundle(self, i: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=i)

    def start_ranks(self) -> list:
        """New ranks joined in one process group at a rendezvous chosen on rank 0's node."""
        cfg = self.cfg
        probe = rendezvous.options(scheduling_strategy=self.in_bundle(0)).remote()
        address, port, self.rendezvous_node = wait_all(
            [probe],
            "choosing the learners' rendezvous on rank 0's node",
            cfg.train.stage_timeout_s,
            "train.stage_timeout_s",
        )[0]
        return [
            LearnerActor.options(
                num_cpus=cfg.learner.num_cpus, num_gpus=cfg.learner.num_gpus, scheduling_strategy=self.in_bundle(rank)
            ).remote(cfg.target, cfg.draft, cfg.learner, cfg.objective, rank, address, port, self.buffer)
            for rank in range(cfg.learner.world_size)
        ]

    def call(self, method: str, *args, what: str, while_waiting: Callable[[], None] = lambda: None) -> list:
        """Every rank's result of `method(*args)`; a wait past learner.timeout_s is reported and retried,
        then a LearnerFault. A learner starved of samples stops the job instead (StageTimeout)."""
        refs = [getattr(rank, method).remote(*args) for rank in self.ranks]
        timeout_s, retries = self.cfg.learner.timeout_s, self.cfg.train.wait_retries
        for attempt in range(retries + 1):
            try:
                return wait_all(refs, what, timeout_s, "learner.timeout_s", while_waiting)
            except StageTimeout:
                if attempt < retries:
                    self.console.print(
                        f"[yellow]{what} not done after learner.timeout_s={timeout_s:g} s; "
                        f"waiting again ({attempt + 1}/{retries})"
                    )
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
                if starved(err):
                    raise StageTimeout(f"{what}: no samples from the replay buffer ({one_line(err)})") from err
                raise LearnerFault(f"{what} failed: {type(err).__name__}: {str(err).splitlines()[0]}") from err
        raise LearnerFault(f"{what} not done after {retries + 1} waits of learner.timeout_s={timeout_s:g} s")

    def replace(self, err: LearnerFault) -> None:
        """Kill every rank and start new ones, up to train.max_learner_restarts times in a run."""
        self.restarts += 1
        limit = self.cfg.train.max_learner_restarts
        if self.restarts > limit:
            raise RuntimeError(f"{err}; gave up after train.max_learner_restarts={limit} learner restarts") from err
        self.kill()
        self.ranks = self.start_ranks()
        if self.offline:
            self.call("use_buffer", self.buffer, True, what="pointing new learner ranks at the corpus")

    def use_buffer(self, buffer, offline: bool) -> None:
        """Every rank samples from `buffer` from now on (and so do ranks that replace them)."""
        self.buffer, self.offline = buffer, offline
        self.call("use_buffer", buffer, offline, what="switching the learners' sample source")

    def kill(self) -> None:
        for rank in self.ranks:
            ray.kill(rank, no_restart=True)

    def shutdown(self) -> None:
        self.kill()
        remove_placement_group(self.group)
