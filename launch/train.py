"""`draft-opd train CONFIG [key=value ...]` and `python -m draft_opd.launch.train ...` (for `ray job submit`).

The loop: rollout actors stream trajectories into the replay buffer; learner ranks sample and
step (SFT warm-up, then Draft-OPD, both on the same rollouts); every `publish_every` steps the
full draft weights go once into the object store with a new version and the actors pick them
up between rollouts. The run directory (`launch/run_dir.py`) gets the resolved config,
`metrics.jsonl`, TensorBoard scalars, checkpoints and the final draft, loadable by
`draft-opd eval draft=RUN_DIR/draft`.

Faults: a rollout actor that dies is restarted by Ray and continues its prompt stream
(`RolloutFleet`); learner ranks that die, fail or hang past their retries are replaced and
resume from the latest checkpoint (`LearnerGroup`); a killed job continues with `resume=auto`.
Every such event is a `fault` line in metrics.jsonl. No wait is unbounded: past its deadline a
stage stops the job with one line naming it.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import replace

import ray
from omegaconf import OmegaConf
from rich.console import Console

from draft_opd.buffer import CORPUS_CAPACITY, BufferConfig, ReplayBufferActor, start_named_buffer
from draft_opd.launch import worker_log
from draft_opd.launch.config import Config, job_main, load_config, one_line, to_yaml
from draft_opd.launch.learner_group import LearnerFault, LearnerGroup
from draft_opd.launch.progress import StepProgress, wait_all
from draft_opd.launch.rollout_fleet import RolloutFleet
from draft_opd.launch.run_dir import RunDir, RunState, read_state, write_state
from draft_opd.launch.telemetry import Telemetry

BOOKKEEPING = ("step_s", "tokens", "blocks", "staleness")  # learner results that are not loss terms

RUN_DEFINING = (
    "target",
    "draft",
    "rollout.prompts",
    "rollout.num_prompts",
    "rollout.num_actors",
    "rollout.store_features",
    "rollout.topk_logprobs",
    "learner.world_size",
    "learner.zero_stage",
    "learner.dtype",
    "buffer.dir",
)
"""Settings a checkpoint or the stored buffer depends on: a resumed run must keep them."""


# glibc's allocator gives blocks above its mmap threshold (<= 32 MiB) back to the kernel on free, so each of a
# learner step's [blocks, width, vocab] fp32 tensors (~88 MB on smol) is page-faulted in anew every step; keeping
# freed memory in the process halves an OPD step here (docs/results/benchmarks.md#allocator). Set where unset.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}


def worker_env() -> dict[str, str]:
    """The allocator settings for Ray's workers, the caller's own where it has set them."""
    return {k: os.environ.get(k, v) for k, v in ALLOCATOR_ENV.items()}


def connect_ray(cfg: Config, run: RunDir, console: Console) -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`; `auto` finds one started with
    `ray start`, e.g. by `make dashboard`), else start a private local one sized for the job, whose
    workers write their output to the run directory's log instead of the terminal."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": worker_env()})
        return
    need = cfg.rollout.num_actors * cfg.rollout.num_cpus + cfg.learner.world_size * cfg.learner.num_cpus + 1
    console.print(f"workers' output (weight loading, library warnings) goes to {run.worker_log}")
    ray.init(
        address="local",
        num_cpus=max(int(need + 0.999), os.cpu_count() or 1),
        include_dashboard=False,
        log_to_driver=True,
        logging_level=logging.ERROR,  # not the token-auth notice of every private cluster
        runtime_env=worker_log.runtime_env(run.worker_log, worker_env()),
    )


def phase_of(step: int, cfg: Config) -> str:
    return "sft" if step < cfg.train.sft_steps else "opd"


# --- what this invocation continues -------------------------------------------------------------


def prepare(cfg: Config, run: RunDir, console: Console) -> RunState | dict | None:
    """A checkpoint's state to resume from, a finished run's summary (nothing to do), or None (fresh)."""
    if cfg.resume == "never":
        if earlier := run.earlier_run():
            raise ValueError(
                f"{run} holds an earlier run ({', '.join(earlier)}); continue it with "
                "resume=auto, or start a new one with name=NEW_NAME"
            )
        run.path.mkdir(parents=True, exist_ok=True)
        return None
    summary = run.summary()
    if summary is not None:
        console.print(
            f"{run} is a finished run (held-out tau {summary['tau_before']:.3f} -> "
            f"{summary['tau_after']:.3f}, draft in {summary['draft']}); to train again, delete "
            f"{run} or start a new run with name=NEW_NAME"
        )
        return summary
    check_same_run(cfg, run)
    checkpoint = run.latest_checkpoint()
    state = read_state(checkpoint) if checkpoint else None
    run.path.mkdir(parents=True, exist_ok=True)
    run.keep_records_until(state.step if state else -1)
    console.print(f"resuming {run} from {checkpoint}" if checkpoint else f"no checkpoint in {run}; fresh start")
    return state


def check_same_run(cfg: Config, run: RunDir) -> None:
    """Refuse to resume a run directory that another configuration (or an older version of us) wrote."""
    if not run.config_file.exists():
        return
    fresh = f"delete {run} or start a new run with name=NEW_NAME"
    try:
        saved = load_config(run.config_file)
    except ValueError as err:
        raise ValueError(f"{run} holds a run this version cannot resume ({one_line(err)}); {fresh}") from None
    old, new = run_settings(saved), run_settings(cfg)
    changed = [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]
    if changed:
        raise ValueError(
            f"{run} holds a run started with other settings ({'; '.join(changed)}); resume it "
            f"with its own settings (they are in {run.config_file}), or {fresh}"
        )


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


# --- the parts of a running job -------------------------------------------------------------------


def corpus_config(cfg: Config) -> BufferConfig:
    """The offline SFT corpus (written by `draft-opd generate`) as a buffer: read whole, sampled freely."""
    return BufferConfig(
        dir=cfg.train.sft_corpus,
        capacity=CORPUS_CAPACITY,
        min_size_to_sample=1,
        samples_per_insert=None,
        seed=cfg.buffer.seed,
        timeout_s=cfg.buffer.timeout_s,
    )


class Job:
    """The replay buffer, rollout fleet, learner group and telemetry of one run, and what a step does with them."""

    def __init__(self, cfg: Config, run: RunDir, console: Console, state: RunState | None):
        self.cfg, self.run, self.console = cfg, run, console
        run.config_file.write_text(to_yaml(cfg))
        self.telemetry = Telemetry(run.path, cfg.name, purge_step=state.step + 1 if state else 0)
        console.print(
            f"starting the replay buffer, {cfg.rollout.num_actors} rollout actor(s) and "
            f"{cfg.learner.world_size} learner rank(s); each loads the target ..."
        )
        self.buffer, buffer_name = start_named_buffer(
            cfg.buffer if cfg.buffer.dir else replace(cfg.buffer, dir=str(run.buffer_dir))
        )
        if state is not None:
            self.get(self.buffer.load_state_dict.remote(state.buffer), "reopening the replay buffer")
        offline = bool(cfg.train.sft_corpus) and (state.step if state else 0) < cfg.train.sft_steps
        self.fleet = RolloutFleet(
            cfg,
            buffer_name,
            state.positions if state else None,
            state.version if state else 0,
            self.fault,
            rolling=not offline,
        )
        self.learners = LearnerGroup(cfg, self.buffer, console)
        self.corpus: ray.actor.ActorHandle | None = None  # the offline SFT corpus, while SFT samples it
        if offline:
            console.print(
                f"offline SFT on the corpus {cfg.train.sft_corpus} for {cfg.train.sft_steps} steps; "
                "rollouts start with the OPD phase"
            )
            self.corpus = ReplayBufferActor.remote(corpus_config(cfg))
            self.learners.use_buffer(self.corpus, offline=True)
        self.tau_before = state.tau_before if state else None
        self.eval_pending: tuple[int, ray.ObjectRef] | None = None  # a periodic evaluation in flight

    def get(self, ref: ray.ObjectRef, what: str):
        """One result the driver cannot go on without; past train.stage_timeout_s the job stops, naming it."""
        return wait_all([ref], what, self.cfg.train.stage_timeout_s, "train.stage_timeout_s")[0]

    def fault(self, kind: str, **details) -> None:
        self.console.print(f"[yellow]fault: {kind} {details}; recovering")
        self.telemetry.log({"phase": "fault", "fault": kind, "time": time.time(), **details})

    def call_learners(self, method: str, *args, what: str) -> list:
        """Every learner rank's result; rollouts go on meanwhile (they feed the samples waited on)."""
        return self.learners.call(method, *args, what=what, while_waiting=self.fleet.harvest)

    def publish(self) -> float:
        """Gather the full draft weights and hand them to the rollout actors as the next version."""
        start = time.perf_counter()
        self.fleet.set_draft(self.fleet.version + 1, self.call_learners("full_weights", what="publish")[0])
        return time.perf_counter() - start

    def resume_learners(self, checkpoint: RunState | None) -> int:
        """Learners from a checkpoint's step (or from the initial draft), published; the step to continue from."""
        step = 0
        if checkpoint is not None:
            directory = self.run.checkpoint(checkpoint.step)
            step = self.call_learners("load_checkpoint", str(directory), what=f"loading {directory}")[0]
        self.publish()
        return step

    def recover(self, err: LearnerFault) -> int:
        """Replace every learner rank and resume from the latest checkpoint; the step to continue from."""
        latest = self.run.latest_checkpoint()
        self.fault("learner failed", error=str(err), resume_from=str(latest))
        self.learners.replace(err)
        return self.resume_learners(read_state(latest) if latest else None)

    def save_checkpoint(self, step: int) -> None:
        directory = self.run.checkpoint(step)
        directory.mkdir(parents=True, exist_ok=True)
        self.call_learners("save_checkpoint", str(directory), what="checkpoint")
        self.get(self.buffer.flush.remote(), "sealing the buffer segment")  # every trajectory so far is on disk
        write_state(
            directory,
            RunState(
                step=step,
                version=self.fleet.version,
                positions=list(self.fleet.positions),
                buffer=self.get(self.buffer.state_dict.remote(), "the buffer's counters"),
                tau_before=self.tau_before,
            ),
        )
        self.run.rotate(self.cfg.train.keep_checkpoints)

    def evaluate(self, step: int, phase: str, ref: ray.ObjectRef | None = None) -> dict:
        """Held-out tau of the draft the evaluating actor holds, logged; waits for it (with a deadline)."""
        result = self.get(ref or self.fleet.evaluate(), f"held-out tau ({phase}, step {step})")
        self.telemetry.log({"step": step, "phase": phase, "time": time.time(), **result})
        self.telemetry.scalar("eval_tau", result["eval_tau"], step, benchmark=self.cfg.train.eval_benchmark)
        return result

    def log_evaluation(self, wait: bool) -> None:
        """Log the periodic evaluation in flight once it is done; never block training on it unless `wait`."""
        if self.eval_pending is None:
            return
        step, ref = self.eval_pending
        if wait or ray.wait([ref], timeout=0)[0]:
            self.eval_pending = None
            try:
                self.evaluate(step, "eval", ref)
            except ray.exceptions.RayActorError as err:
                self.fault("evaluation lost with its actor", step=step, error=str(err).splitlines()[0])

    def step(self, step: int) -> dict:
        """Learner step `step + 1`: every rank samples and trains; then publish, log and evaluate when due."""
        phase, train = phase_of(step, self.cfg), self.cfg.train
        if phase == "opd" and self.learners.offline:  # offline SFT is over: rollouts feed the learners
            self.learners.use_buffer(self.buffer, offline=False)
            self.fleet.start_rolling()
        results = self.call_learners("step", phase, self.fleet.version, what=f"learner step {step + 1}")
        record = {
            "step": step + 1,
            "phase": phase,
            "loss": statistics.fmean(r["loss"] for r in results),
            "tau": self.fleet.tau(),
            "draft_version": self.fleet.version,
            "learner_tokens_per_s": sum(r["tokens"] / r["step_s"] for r in results),
            "trained_tokens": sum(r["tokens"] for r in results),
            "time": time.time(),
            **self.fleet.take_counts(),  # the target work that fed this step: the study's cost axis
            "rollout_tokens_per_s": sum(self.fleet.tokens_per_s),
            "staleness": statistics.fmean(r["staleness"] for r in results),
            "buffer_size": self.get(self.buffer.stats.remote(), "the buffer's size")["size"],
            **{k: v for k, v in results[0].items() if k not in ("loss", "tokens", "blocks", "staleness")},
        }
        last = step + 1 == train.sft_steps + train.opd_steps  # the final evaluation follows
        eval_due = (
            bool(train.eval_every) and (step + 1) % train.eval_every == 0 and not last and self.eval_pending is None
        )
        if (step + 1) % train.publish_every == 0 or eval_due:  # an evaluation measures these weights
            record["publish_s"] = self.publish()
        self.telemetry.log(record)
        self.report(record, results)
        self.log_evaluation(wait=False)
        if eval_due:
            self.eval_pending = (step + 1, self.fleet.evaluate())
        return record

    def report(self, record: dict, results: list[dict]) -> None:
        """The live views (Ray metrics, TensorBoard) of one step."""
        step, scalar = record["step"], self.telemetry.scalar
        self.fleet.report(scalar, step)
        for term in ("loss", *(k for k in results[0] if k not in ("loss", *BOOKKEEPING))):
            scalar("loss", statistics.fmean(r[term] for r in results), step, term=term)
        for name in ("learner_tokens_per_s", "buffer_size", "staleness", "draft_version"):
            scalar(name, record[name], step)
        scalar("publish_seconds", record.get("publish_s"), step)
        scalar("step", step, step)

    def finish(self) -> dict:
        """Held-out tau of the final weights, the draft saved, the buffer sealed."""
        self.get(self.buffer.release_inserts.remote(), "releasing blocked inserts")  # actors finish their rollouts
        self.log_evaluation(wait=True)
        self.publish()
        self.console.print("measuring held-out tau of the trained draft ...")
        final = self.evaluate(self.cfg.train.sft_steps + self.cfg.train.opd_steps, "final")  # after the publish
        self.call_learners("save_draft", str(self.run.draft_dir), what="save draft")
        self.get(self.buffer.close.remote(), "closing the replay buffer")  # seals the open segment
        self.telemetry.close()
        return final

    def close(self) -> None:
        """Every actor of the job killed and its resources given back; Ray itself stays up for the next job."""
        self.learners.shutdown()
        self.fleet.shutdown()
        for buffer in (self.buffer, self.corpus):
            if buffer is not None:
                ray.kill(buffer, no_restart=True)


# --- the loop -----------------------------------------------------------------------------------


def run_steps(job: Job, state: RunState | None, total: int) -> dict:
    """The learner steps from the state's (or from the start), then the final evaluation."""
    cfg, console = job.cfg, job.console
    step = job.resume_learners(state) if state else 0
    if state is None:
        console.print(f"run directory {job.run}; measuring held-out tau of the initial draft ...")
        job.tau_before = job.evaluate(0, "init")["eval_tau"]
    console.print(
        f"held-out tau before training: {job.tau_before:.3f}; training {total} steps "
        f"({cfg.train.sft_steps} sft, {cfg.train.opd_steps} opd)"
    )
    with StepProgress(console, total, step) as progress:
        while step < total:
            try:
                record = job.step(step)
                step += 1
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                    job.save_checkpoint(step)
            except LearnerFault as err:
                step = job.recover(err)
                progress.update(step)
                continue
            tau = f"tau {record['tau']:.2f}" if record["tau"] else "tau -"
            progress.update(step, record["phase"], f"loss {record['loss']:.3f}  {tau}  v{record['draft_version']}")
    return job.finish()


def train(cfg: Config, console: Console | None = None) -> dict:
    console = console or Console(stderr=True, soft_wrap=True)
    total = cfg.train.sft_steps + cfg.train.opd_steps
    if total < 1:
        raise ValueError("nothing to train: set train.sft_steps and/or train.opd_steps above 0")
    started = time.perf_counter()
    run = RunDir(os.path.join(cfg.train.out_dir, cfg.name))
    state = prepare(cfg, run, console)
    if isinstance(state, dict):
        return state
    connect_ray(cfg, run, console)
    job = Job(cfg, run, console, state)
    try:
        final = run_steps(job, state, total)
    finally:
        job.close()
    summary = {
        "tau_before": job.tau_before,
        "tau_after": final["eval_tau"],
        "steps": total,
        "draft": str(run.draft_dir),
        "wall_s": time.perf_counter() - started,
        "learner_restarts": job.learners.restarts,
    }
    run.write_summary(summary)
    console.print(
        f"held-out tau ({cfg.train.eval_benchmark}, {cfg.train.eval_prompts} prompts): "
        f"{job.tau_before:.3f} before -> {final['eval_tau']:.3f} after; draft saved to {run.draft_dir}"
    )
    return summary


def main(argv: list[str] | None = None) -> None:
    job_main(train, "train", argv)


if __name__ == "__main__":
    main()
