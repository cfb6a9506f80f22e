"""`draft-opd train CONFIG [key=value ...]` and `python -m launch.train ...` (for `ray job submit`).

The loop: rollout actors stream trajectories into the replay buffer; learner ranks sample and
step (SFT warm-up, then Draft-OPD, both on the same rollouts); every `publish_every` steps the
full draft weights go once into the object store with a new version and the actors pick them
up between rollouts. The run directory gets the resolved config, `metrics.jsonl` (one line per
learner step) and the final draft, loadable by `draft-opd eval draft=RUN_DIR/draft`.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

import ray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from actors.rollout import start_rollout_actors
from buffer import ReplayBufferActor
from launch.config import Config, job_main, to_yaml
from learner.engine import start_learners


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step, flushed at once so a crash loses nothing logged."""

    def __init__(self, path: Path):
        self.file = path.open("a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def connect_ray(cfg: Config) -> None:
    """Join the cluster of `ray job submit` / `ray start` (RAY_ADDRESS), else start a local one."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    need = cfg.rollout.num_actors * cfg.rollout.num_cpus + cfg.learner.world_size * cfg.learner.num_cpus + 1
    kwargs = {} if address else {"num_cpus": max(int(need + 0.999), os.cpu_count() or 1), "include_dashboard": False}
    ray.init(address=address, log_to_driver=True, **kwargs)


def phase_of(step: int, cfg: Config) -> str:
    return "sft" if step < cfg.train.sft_steps else "opd"


class Run:
    """The processes of one training run and the loop that drives them."""

    def __init__(self, cfg: Config, console: Console):
        self.cfg, self.console = cfg, console
        self.dir = Path(cfg.train.out_dir) / cfg.name
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(to_yaml(cfg))
        buffer_cfg = cfg.buffer if cfg.buffer.dir else replace(cfg.buffer, dir=str(self.dir / "buffer"))
        self.buffer = ReplayBufferActor.remote(buffer_cfg)
        self.actors, self.group = start_rollout_actors(cfg.target, cfg.draft, cfg.rollout, self.buffer)
        self.learners = start_learners(cfg.target, cfg.draft, cfg.learner, cfg.objective, self.buffer)
        self.version = 0
        self.taus: deque[float] = deque(maxlen=16)
        self.rollout_tokens_per_s = 0.0
        self.pending = {a.run.remote(cfg.train.rollouts_per_call): a for a in self.actors}
        self.metrics = MetricsLog(self.dir / "metrics.jsonl")
        self.eval_pending: tuple[int, ray.ObjectRef] | None = None

    def submit_evaluation(self) -> ray.ObjectRef:
        """Held-out tau on rollout actor 0 (queued behind its rollouts), with the draft version it holds."""
        t = self.cfg.train
        return self.actors[0].evaluate_tau.remote(t.eval_benchmark, t.eval_prompts, t.eval_max_new_tokens,
                                                  self.cfg.data.get(t.eval_benchmark))

    def log_evaluation(self, wait: bool) -> None:
        """Write the pending periodic evaluation once it is done; never block training on it unless `wait`."""
        if self.eval_pending is None:
            return
        step, ref = self.eval_pending
        if wait or ray.wait([ref], timeout=0)[0]:
            self.metrics.write({"step": step, "phase": "eval", **ray.get(ref)})
            self.eval_pending = None

    def harvest_rollouts(self, wait_s: float = 0.0) -> None:
        """Collect finished rollout calls (waiting up to `wait_s` for one) and start the next ones."""
        ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=wait_s)
        if ready:
            ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
        for ref in ready:
            actor = self.pending.pop(ref)
            stats = ray.get(ref)
            self.taus.append(stats["tau"])
            self.rollout_tokens_per_s = stats["tokens_per_s"]
            self.pending[actor.run.remote(self.cfg.train.rollouts_per_call)] = actor

    def learner_results(self, refs: list) -> list[dict]:
        """Wait for the learner ranks while keeping the rollout actors busy (they feed the samples waited on)."""
        deadline = time.monotonic() + self.cfg.learner.timeout_s
        while len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) < len(refs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"learner step not done after learner.timeout_s={self.cfg.learner.timeout_s:g} s")
            self.harvest_rollouts(wait_s=0.2)
        return ray.get(refs)

    def publish(self) -> float:
        """Gather the full draft weights, put them once in the object store, hand the ref to every actor."""
        start = time.perf_counter()
        weights = ray.get([rank.full_weights.remote() for rank in self.learners],
                          timeout=self.cfg.learner.timeout_s)[0]
        self.version += 1
        ref = ray.put(weights)
        for actor in self.actors:
            actor.set_draft.remote(self.version, ref)  # applied between rollouts
        return time.perf_counter() - start

    def step(self, step: int) -> dict:
        phase = phase_of(step, self.cfg)
        results = self.learner_results([rank.step.remote(phase, self.version) for rank in self.learners])
        record = {"step": step + 1, "phase": phase, "loss": statistics.fmean(r["loss"] for r in results),
                  "tau": statistics.fmean(self.taus) if self.taus else None, "draft_version": self.version,
                  "learner_tokens_per_s": sum(r["tokens"] / r["step_s"] for r in results),
                  "rollout_tokens_per_s": self.rollout_tokens_per_s,
                  **{k: v for k, v in results[0].items() if k not in ("loss", "tokens", "blocks")}}
        if (step + 1) % self.cfg.train.publish_every == 0:
            record["publish_s"] = self.publish()
        self.metrics.write(record)
        self.log_evaluation(wait=False)
        if self.cfg.train.eval_every and (step + 1) % self.cfg.train.eval_every == 0 and self.eval_pending is None:
            self.eval_pending = (step + 1, self.submit_evaluation())
        return record

    def finish(self) -> Path:
        ray.get([rank.save_draft.remote(str(self.dir / "draft")) for rank in self.learners],
                timeout=self.cfg.learner.timeout_s)
        ray.get(self.buffer.close.remote())  # seals the open segment
        self.metrics.close()
        return self.dir / "draft"


def train(cfg: Config, console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    total = cfg.train.sft_steps + cfg.train.opd_steps
    if total < 1:
        raise ValueError("nothing to train: set train.sft_steps and/or train.opd_steps above 0")
    started = time.perf_counter()
    connect_ray(cfg)
    run = Run(cfg, console)
    console.print(f"run directory {run.dir}; measuring held-out tau of the initial draft ...")
    tau_before = ray.get(run.submit_evaluation())["eval_tau"]
    run.metrics.write({"step": 0, "phase": "init", "eval_tau": tau_before, "draft_version": 0})
    console.print(f"held-out tau before training: {tau_before:.3f}")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=total, status="")
        for step in range(total):
            record = run.step(step)
            tau = f"tau {record['tau']:.2f}" if record["tau"] else "tau -"
            progress.update(task, advance=1, description=f"train [{record['phase']}]",
                            status=f"loss {record['loss']:.3f}  {tau}  v{record['draft_version']}")
    ray.get(run.buffer.release_inserts.remote())  # actors blocked on the ratio must finish their rollouts
    run.log_evaluation(wait=True)
    run.publish()
    final = ray.get(run.submit_evaluation())  # queued behind the publish on that actor, so it sees the final weights
    tau_after = final["eval_tau"]
    run.metrics.write({"step": total, "phase": "final", "eval_tau": tau_after,
                       "draft_version": final["draft_version"]})
    draft = run.finish()
    summary = {"tau_before": tau_before, "tau_after": tau_after, "steps": total, "draft": str(draft),
               "wall_s": time.perf_counter() - started}
    (run.dir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"held-out tau ({cfg.train.eval_benchmark}, {cfg.train.eval_prompts} prompts): "
                  f"{tau_before:.3f} before -> {tau_after:.3f} after; draft saved to {draft}")
    return summary


def main(argv: list[str] | None = None) -> None:
    job_main(train, "train", argv)


if __name__ == "__main__":
    main()
