"""`draft-opd train CONFIG [key=value ...]` and `python -m launch.train ...` (for `ray job submit`).

The loop: rollout actors stream trajectories into the replay buffer; learner ranks sample and
step (SFT warm-up, then Draft-OPD, both on the same rollouts); every `publish_every` steps the
full draft weights go once into the object store with a new version and the actors pick them
up between rollouts. The run directory gets the resolved config, `metrics.jsonl` (one line per
learner step), TensorBoard scalars, checkpoints and the final draft, loadable by
`draft-opd eval draft=RUN_DIR/draft`.

Faults: a rollout actor that dies is restarted by Ray (its partial trajectory was never
inserted) and continues its prompt stream; learner ranks that die, fail or hang past their
retries are replaced and resume from the latest checkpoint; a killed job continues with
`resume=auto`. Every such event is a `fault` line in metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Callable

import ray
from omegaconf import OmegaConf
from rich.console import Console

from actors.rollout import start_rollout_actors
from buffer import RateLimitTimeout, ReplayBufferActor
from launch.checkpoint import RunState, checkpoint_dir, latest_checkpoint, read_state, rotate, write_state
from launch.config import Config, job_main, load_config, one_line, to_yaml
from launch.progress import StageTimeout, StepProgress, wait_all
from launch.telemetry import Telemetry
from learner.engine import start_learners

BOOKKEEPING = ("step_s", "tokens", "blocks", "staleness")  # learner results that are not loss terms


class LearnerFault(RuntimeError):
    """A learner rank died, raised, or hung past its retries."""


def connect_ray(cfg: Config) -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`; `auto` finds one started with
    `ray start`, e.g. by `make dashboard`), else start a private local one sized for the job."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    need = cfg.rollout.num_actors * cfg.rollout.num_cpus + cfg.learner.world_size * cfg.learner.num_cpus + 1
    ray.init(address="local", num_cpus=max(int(need + 0.999), os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=True)


def phase_of(step: int, cfg: Config) -> str:
    return "sft" if step < cfg.train.sft_steps else "opd"


def starved(err: BaseException | None) -> bool:
    """The learner's sample timed out: the rollout side produced nothing, which replacing learners cannot fix."""
    while err is not None:
        if isinstance(err, (RateLimitTimeout, ray.exceptions.GetTimeoutError)):
            return True
        err = getattr(err, "cause", None) or err.__cause__
    return False


def wait_learners(refs: list, what: str, cfg: Config, console: Console,
                  while_waiting: Callable[[], None] = lambda: time.sleep(0.2)) -> list:
    """All results of `refs`; a wait past learner.timeout_s is reported and retried, never a hang."""
    timeout_s, retries = cfg.learner.timeout_s, cfg.train.wait_retries
    for attempt in range(retries + 1):
        try:
            return wait_all(refs, what, timeout_s, "learner.timeout_s", while_waiting)
        except StageTimeout:
            if attempt < retries:
                console.print(f"[yellow]{what} not done after learner.timeout_s={timeout_s:g} s; "
                              f"waiting again ({attempt + 1}/{retries})")
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
            if starved(err):
                raise StageTimeout(f"{what}: no samples from the replay buffer ({one_line(err)})") from err
            raise LearnerFault(f"{what} failed: {type(err).__name__}: {str(err).splitlines()[0]}") from err
    raise LearnerFault(f"{what} not done after {retries + 1} waits of learner.timeout_s={timeout_s:g} s")


class Run:
    """The processes of one training run and the loop that drives them."""

    def __init__(self, cfg: Config, console: Console, state: RunState | None):
        self.cfg, self.console = cfg, console
        self.dir = Path(cfg.train.out_dir) / cfg.name
        (self.dir / "config.yaml").write_text(to_yaml(cfg))
        buffer_cfg = cfg.buffer if cfg.buffer.dir else replace(cfg.buffer, dir=str(self.dir / "buffer"))
        console.print(f"starting the replay buffer, {cfg.rollout.num_actors} rollout actor(s) and "
                      f"{cfg.learner.world_size} learner rank(s); each loads the target ...")
        self.buffer = ReplayBufferActor.remote(buffer_cfg)
        if state is not None:
            self.get(self.buffer.load_state_dict.remote(state.buffer), "reopening the replay buffer")
        self.actors, self.group = start_rollout_actors(cfg.target, cfg.draft, cfg.rollout, self.buffer)
        self.learners = start_learners(cfg.target, cfg.draft, cfg.learner, cfg.objective, self.buffer)
        self.telemetry = Telemetry(self.dir, cfg.name, purge_step=state.step + 1 if state else 0)
        self.version, self.weights = state.version if state else 0, None
        self.positions = state.positions if state else [0] * len(self.actors)
        self.tau_before = state.tau_before if state else None
        self.actor_taus = [deque(maxlen=8) for _ in self.actors]
        self.actor_tokens_per_s = [0.0] * len(self.actors)
        self.acceptance: deque[list[float]] = deque(maxlen=16)
        self.learner_restarts = 0
        self.eval_pending: tuple[int, ray.ObjectRef] | None = None
        self.pending: dict[ray.ObjectRef, tuple[int, str]] = {}  # rollout actor calls in flight
        if state is not None:
            self.load_learners(checkpoint_dir(self.dir, state.step))
            self.publish()
        for i in range(len(self.actors)):
            self.restore_actor(i)  # then it rolls out

    def get(self, ref: ray.ObjectRef, what: str):
        """One result the driver cannot go on without; past train.stage_timeout_s the job stops, naming it."""
        return wait_all([ref], what, self.cfg.train.stage_timeout_s, "train.stage_timeout_s")[0]

    # --- rollouts -------------------------------------------------------------------------

    def harvest_rollouts(self, wait_s: float = 0.0) -> None:
        """Collect finished rollout calls (waiting up to `wait_s` for one) and start the next ones."""
        ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=wait_s)
        if ready:
            ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
        for ref in ready:
            i, call = self.pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                if call == "run":
                    self.fault("rollout actor died", actor=f"rollout-{i}", error=str(err).splitlines()[0])
                else:
                    time.sleep(0.5)  # still restarting
                self.restore_actor(i)
                continue
            if call == "run":
                self.positions[i] = result["prompt_position"]
                self.actor_taus[i].append(result["tau"])
                self.actor_tokens_per_s[i] = result["tokens_per_s"]
                self.acceptance.append(result["acceptance_by_position"])
            elif self.weights is not None:  # restored: give it the current draft before it rolls out again
                self.actors[i].set_draft.remote(self.version, self.weights)
            self.pending[self.actors[i].run.remote(self.cfg.train.rollouts_per_call)] = (i, "run")

    def restore_actor(self, i: int) -> None:
        """Ray restarts a dead actor (max_restarts=-1) as a fresh process; once it answers, it continues its
        prompt stream. Its unfinished trajectory never reached the buffer (inserts are whole rows)."""
        present = self.get(self.buffer.traj_ids.remote(), "the replay buffer's trajectory ids")
        self.pending[self.actors[i].restore.remote(self.positions[i], present)] = (i, "restore")

    def fault(self, kind: str, **details) -> None:
        self.console.print(f"[yellow]fault: {kind} {details}; recovering")
        self.telemetry.log({"phase": "fault", "fault": kind, "time": time.time(), **details})

    # --- evaluation -----------------------------------------------------------------------

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
            self.eval_pending = None
            try:
                result = self.get(ref, f"held-out tau at step {step}")
            except ray.exceptions.RayActorError as err:
                self.fault("evaluation lost with its actor", step=step, error=str(err).splitlines()[0])
                return
            self.log_eval_tau(step, "eval", result)

    def log_eval_tau(self, step: int, phase: str, result: dict) -> None:
        self.telemetry.log({"step": step, "phase": phase, **result})
        self.telemetry.scalar("eval_tau", result["eval_tau"], step, benchmark=self.cfg.train.eval_benchmark)

    # --- learners -------------------------------------------------------------------------

    def wait_learners(self, refs: list, what: str) -> list:
        """Learner results; rollout actors are kept busy meanwhile (they feed the samples waited on)."""
        return wait_learners(refs, what, self.cfg, self.console, lambda: self.harvest_rollouts(wait_s=0.2))

    def publish(self) -> float:
        """Gather the full draft weights, put them once in the object store, hand the ref to every actor."""
        start = time.perf_counter()
        weights = self.wait_learners([rank.full_weights.remote() for rank in self.learners], "publish")[0]
        self.version += 1
        self.weights = ray.put(weights)
        for actor in self.actors:
            actor.set_draft.remote(self.version, self.weights)  # applied between rollouts
        return time.perf_counter() - start

    def load_learners(self, checkpoint: Path) -> int:
        return self.wait_learners([rank.load_checkpoint.remote(str(checkpoint)) for rank in self.learners],
                                  f"loading {checkpoint}")[0]

    def restart_learners(self, err: LearnerFault) -> int:
        """Replace every rank (a collective cannot continue without the lost one) and resume from the latest
        checkpoint, or from the initial draft when there is none; returns the step to continue from."""
        self.learner_restarts += 1
        if self.learner_restarts > self.cfg.train.max_learner_restarts:
            raise RuntimeError(f"{err}; gave up after train.max_learner_restarts="
                               f"{self.cfg.train.max_learner_restarts} learner restarts") from err
        checkpoint = latest_checkpoint(self.dir)
        self.fault("learner failed", error=str(err), resume_from=str(checkpoint))
        for rank in self.learners:
            ray.kill(rank, no_restart=True)
        self.learners = start_learners(self.cfg.target, self.cfg.draft, self.cfg.learner, self.cfg.objective,
                                       self.buffer)
        step = self.load_learners(checkpoint) if checkpoint else 0
        self.publish()
        return step

    def save_checkpoint(self, step: int) -> Path:
        directory = checkpoint_dir(self.dir, step)
        directory.mkdir(parents=True, exist_ok=True)
        self.wait_learners([rank.save_checkpoint.remote(str(directory)) for rank in self.learners], "checkpoint")
        self.get(self.buffer.flush.remote(), "sealing the buffer segment")  # every trajectory so far is on disk
        state = RunState(step=step, version=self.version, positions=list(self.positions),
                         buffer=self.get(self.buffer.state_dict.remote(), "the buffer's counters"),
                         tau_before=self.tau_before)
        write_state(directory, state)
        rotate(self.dir, self.cfg.train.keep_checkpoints)
        return directory

    # --- one step -------------------------------------------------------------------------

    def step(self, step: int) -> dict:
        phase = phase_of(step, self.cfg)
        results = self.wait_learners([rank.step.remote(phase, self.version) for rank in self.learners],
                                     f"learner step {step + 1}")
        taus = [statistics.fmean(t) for t in self.actor_taus if t]
        record = {"step": step + 1, "phase": phase, "loss": statistics.fmean(r["loss"] for r in results),
                  "tau": statistics.fmean(taus) if taus else None, "draft_version": self.version,
                  "learner_tokens_per_s": sum(r["tokens"] / r["step_s"] for r in results),
                  "rollout_tokens_per_s": sum(self.actor_tokens_per_s),
                  "staleness": statistics.fmean(r["staleness"] for r in results),
                  "buffer_size": self.get(self.buffer.stats.remote(), "the buffer's size")["size"],
                  **{k: v for k, v in results[0].items() if k not in ("loss", "tokens", "blocks", "staleness")}}
        if (step + 1) % self.cfg.train.publish_every == 0:
            record["publish_s"] = self.publish()
        self.telemetry.log(record)
        self.report(record, results)
        self.log_evaluation(wait=False)
        if self.cfg.train.eval_every and (step + 1) % self.cfg.train.eval_every == 0 and self.eval_pending is None:
            self.eval_pending = (step + 1, self.submit_evaluation())
        return record

    def report(self, record: dict, results: list[dict]) -> None:
        """The live views (Ray metrics, TensorBoard) of one step."""
        step, scalar = record["step"], self.telemetry.scalar
        for i, taus in enumerate(self.actor_taus):
            if taus:
                scalar("tau", statistics.fmean(taus), step, actor=f"rollout-{i}")
                scalar("rollout_tokens_per_s", self.actor_tokens_per_s[i], step, actor=f"rollout-{i}")
        if self.acceptance:
            width = min(map(len, self.acceptance))
            for j in range(width):
                scalar("acceptance_rate", statistics.fmean(a[j] for a in self.acceptance), step, position=str(j + 1))
        for term in ("loss", *(k for k in results[0] if k not in ("loss", *BOOKKEEPING))):
            scalar("loss", statistics.fmean(r[term] for r in results), step, term=term)
        for name in ("learner_tokens_per_s", "buffer_size", "staleness", "draft_version"):
            scalar(name, record[name], step)
        scalar("publish_seconds", record.get("publish_s"), step)
        scalar("step", step, step)

    def finish(self) -> Path:
        self.wait_learners([rank.save_draft.remote(str(self.dir / "draft")) for rank in self.learners], "save draft")
        self.get(self.buffer.close.remote(), "closing the replay buffer")  # seals the open segment
        self.telemetry.close()
        return self.dir / "draft"


def prepare_run_dir(cfg: Config, console: Console) -> RunState | dict | None:
    """What this invocation continues: a checkpoint's state, a finished run's summary, or nothing (fresh)."""
    run_dir = Path(cfg.train.out_dir) / cfg.name
    earlier = [p.name for p in (run_dir / "metrics.jsonl", run_dir / "checkpoints", run_dir / "summary.json")
               if p.exists()]
    if cfg.resume == "never":
        if earlier:
            raise ValueError(f"{run_dir} holds an earlier run ({', '.join(earlier)}); continue it with resume=auto, "
                             "or start a new one with name=NEW_NAME")
        run_dir.mkdir(parents=True, exist_ok=True)
        return None
    if (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
        console.print(f"{run_dir} is a finished run (held-out tau {summary['tau_before']:.3f} -> "
                      f"{summary['tau_after']:.3f}, draft in {summary['draft']}); to train again, delete "
                      f"{run_dir} or start a new run with name=NEW_NAME")
        return summary
    check_same_run(cfg, run_dir)
    checkpoint = latest_checkpoint(run_dir)
    state = read_state(checkpoint) if checkpoint else None
    run_dir.mkdir(parents=True, exist_ok=True)
    keep_metrics_until(run_dir / "metrics.jsonl", state.step if state else -1)
    console.print(f"resuming {run_dir} from {checkpoint}" if checkpoint else f"no checkpoint in {run_dir}; fresh start")
    return state


RUN_DEFINING = ("target", "draft", "rollout.prompts", "rollout.num_prompts", "rollout.num_actors",
                "rollout.store_features", "rollout.topk_logprobs", "learner.world_size", "learner.zero_stage",
                "learner.dtype", "buffer.dir")
"""Settings a checkpoint or the stored buffer depends on: a resumed run must keep them."""


def check_same_run(cfg: Config, run_dir: Path) -> None:
    """Refuse to resume a run directory that another configuration (or an older version of us) wrote."""
    saved_file = run_dir / "config.yaml"
    if not saved_file.exists():
        return
    fresh = f"delete {run_dir} or start a new run with name=NEW_NAME"
    try:
        saved = load_config(saved_file)
    except ValueError as err:
        raise ValueError(f"{run_dir} holds a run this version cannot resume ({one_line(err)}); {fresh}") from None
    old, new = run_settings(saved), run_settings(cfg)
    changed = [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
               if old.get(key) != new.get(key)]
    if changed:
        raise ValueError(f"{run_dir} holds a run started with other settings ({'; '.join(changed)}); resume it "
                         f"with its own settings (they are in {saved_file}), or {fresh}")


def run_settings(cfg: Config) -> dict[str, object]:
    """The RUN_DEFINING settings of `cfg` as dotted keys -> values."""
    flat: dict[str, object] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for name, value in node.items():
                walk(value, f"{prefix}{name}.")
        elif prefix[:-1].startswith(RUN_DEFINING):
            flat[prefix[:-1]] = node

    walk(OmegaConf.to_container(OmegaConf.structured(cfg)), "")
    return flat


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop metrics.jsonl lines logged after `step`: the resumed run logs those steps again."""
    if not path.exists():
        return
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in records if r["phase"] == "fault" or r.get("step", -1) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def train(cfg: Config, console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    total = cfg.train.sft_steps + cfg.train.opd_steps
    if total < 1:
        raise ValueError("nothing to train: set train.sft_steps and/or train.opd_steps above 0")
    started = time.perf_counter()
    state = prepare_run_dir(cfg, console)
    if isinstance(state, dict):
        return state
    connect_ray(cfg)
    run = Run(cfg, console, state)
    if state is None:
        console.print(f"run directory {run.dir}; measuring held-out tau of the initial draft ...")
        result = run.get(run.submit_evaluation(), "held-out tau of the initial draft")
        run.tau_before = result["eval_tau"]
        run.log_eval_tau(0, "init", result)
    console.print(f"held-out tau before training: {run.tau_before:.3f}; training {total} steps "
                  f"({cfg.train.sft_steps} sft, {cfg.train.opd_steps} opd)")
    step = state.step if state else 0
    with StepProgress(console, total, step) as progress:
        while step < total:
            try:
                record = run.step(step)
                step += 1
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                    run.save_checkpoint(step)
            except LearnerFault as err:
                step = run.restart_learners(err)
                progress.update(step)
                continue
            tau = f"tau {record['tau']:.2f}" if record["tau"] else "tau -"
            progress.update(step, record["phase"], f"loss {record['loss']:.3f}  {tau}  v{record['draft_version']}")
    run.get(run.buffer.release_inserts.remote(), "releasing blocked inserts")  # actors must finish their rollouts
    run.log_evaluation(wait=True)
    run.publish()
    console.print("measuring held-out tau of the trained draft ...")
    # queued behind the publish on that actor, so it sees the final weights
    final = run.get(run.submit_evaluation(), "held-out tau of the trained draft")
    run.log_eval_tau(total, "final", final)
    draft = run.finish()
    summary = {"tau_before": run.tau_before, "tau_after": final["eval_tau"], "steps": total, "draft": str(draft),
               "wall_s": time.perf_counter() - started, "learner_restarts": run.learner_restarts}
    (run.dir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"held-out tau ({cfg.train.eval_benchmark}, {cfg.train.eval_prompts} prompts): "
                  f"{run.tau_before:.3f} before -> {final['eval_tau']:.3f} after; draft saved to {draft}")
    return summary


def main(argv: list[str] | None = None) -> None:
    job_main(train, "train", argv)


if __name__ == "__main__":
    main()
