"""The run configuration: one omegaconf structured schema, a YAML file per scenario, dotlist overrides.

`draft-opd eval configs/smol.yaml eval.num_prompts=4 draft.init=random` merges the schema, the
file and the overrides in that order. An unknown key is an error that names the closest valid
key; `draft=PATH` is shorthand for `draft.path=PATH`.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from draft_opd.actors.prompts import load_prompts
from draft_opd.actors.rollout import RolloutConfig
from draft_opd.buffer import BufferConfig, ReplayBuffer, holds_sealed_segments
from draft_opd.learner.engine import LearnerConfig, deepspeed_config
from draft_opd.learner.objective import ObjectiveConfig
from draft_opd.learner.presets import preset_overrides
from draft_opd.prompts.sets import benchmark_names
from draft_opd.speculative.loading import DraftSpec
from draft_opd.speculative.target import TargetConfig


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def at_least(section: str, values: object, **minimums: float) -> None:
    """Refuse the first `section.key` below its minimum: such values would not fail, only mislead (None: unset)."""
    for key, low in minimums.items():
        value = getattr(values, key)
        if value is not None and value < low:
            raise ValueError(f"{section}.{key} must be >= {low:g} (got {value})")


@dataclass
class EvalSection:
    benchmarks: list[str] = field(default_factory=lambda: ["gsm8k"])
    num_prompts: int = 8
    max_new_tokens: int = 256
    temperature: float = 0.0
    seeds: int = 1  # sampling seeds per prompt at T > 0 (draft.seed onwards); tau gets a 95 % interval over both
    warmup_tokens: int = 16  # one short untimed decode first, so lazy init does not count
    out: str | None = None  # JSON report path

    def __post_init__(self) -> None:
        at_least("eval", self, num_prompts=1, max_new_tokens=1, temperature=0, seeds=1, warmup_tokens=0)
        if self.seeds > 1 and self.temperature == 0:
            raise ValueError(
                f"eval.seeds={self.seeds} with eval.temperature=0: greedy decoding gives the same text at every "
                "seed; set eval.temperature > 0 (e.g. 1.0) or eval.seeds=1"
            )


@dataclass
class TrainSection:
    sft_steps: int = 100  # learner steps of the SFT warm-up (0 skips it)
    opd_steps: int = 100  # learner steps of Draft-OPD after it (0 skips it)
    publish_every: int = 5  # learner steps between weight publications
    rollouts_per_call: int = 1  # trajectories an actor rolls out between checks for new weights
    eval_benchmark: str = "gsm8k"  # held-out tau before, during and after training
    eval_prompts: int = 4
    eval_max_new_tokens: int = 64
    eval_every: int = 0  # learner steps between held-out evaluations; 0: before and after only
    out_dir: str = "runs"  # the run directory is out_dir/name
    checkpoint_every: int = 100  # learner steps between checkpoints; 0: none
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    wait_retries: int = 2  # a learner step or publish past learner.timeout_s is reported and waited on again
    max_learner_restarts: int = 3  # learner ranks that die or hang are replaced and resume from a checkpoint
    allow_random_init_opd: bool = False  # OPD from a random draft with no SFT before it is refused unless set
    stage_timeout_s: float = 1800.0  # longest wait for any other stage (start-up, an evaluation, the buffer)
    sft_corpus: str | None = None  # a `draft-opd generate` corpus: the SFT phase trains on it offline, no rollouts

    def __post_init__(self) -> None:
        at_least(
            "train",
            self,
            sft_steps=0,
            opd_steps=0,
            publish_every=1,
            rollouts_per_call=1,
            eval_prompts=1,
            eval_max_new_tokens=1,
            eval_every=0,
            checkpoint_every=0,
            keep_checkpoints=1,
            wait_retries=0,
            max_learner_restarts=0,
            stage_timeout_s=0,
        )


@dataclass
class GenerateSection:
    """`draft-opd generate`: the target's responses to training prompts, a corpus for offline SFT."""

    out: str | None = None  # the corpus directory (required): new, or a corpus to complete
    prompts: str | None = None  # a benchmark name or a .json/.jsonl file; None: rollout.prompts
    num_prompts: int | None = None  # the first N; None: rollout.num_prompts with rollout.prompts, else all
    max_new_tokens: int | None = None  # None: rollout.max_new_tokens
    batch_size: int = 16  # sequences per target forward
    temperature: float = 0.0
    store_features: bool = False  # fp16 target features in the corpus; False: the learner recomputes them

    def __post_init__(self) -> None:
        at_least("generate", self, num_prompts=1, max_new_tokens=1, batch_size=1, temperature=0)


@dataclass
class Config:
    name: str = "run"
    resume: str = "never"  # auto: continue from the run directory's latest checkpoint, if any
    threads: int = 0  # torch intra-op threads; 0 = all cores
    target: TargetConfig = field(default_factory=TargetConfig)
    draft: DraftSpec = field(default_factory=DraftSpec)
    eval: EvalSection = field(default_factory=EvalSection)
    data: dict[str, str] = field(default_factory=dict)  # benchmark name -> prompt file
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainSection = field(default_factory=TrainSection)
    generate: GenerateSection = field(default_factory=GenerateSection)

    def __post_init__(self) -> None:
        if self.resume not in ("never", "auto"):
            raise ValueError(f"resume={self.resume!r}: use auto (continue from the latest checkpoint) or never")
        train = self.train
        if train.opd_steps and not train.sft_steps and not self.draft.path and not train.allow_random_init_opd:
            raise ValueError(
                "train.opd_steps > 0 with train.sft_steps=0 and no draft.path starts OPD from a random "
                "draft, whose rollouts accept nothing to learn from: pass draft=PATH (a trained draft, "
                "e.g. z-lab/Qwen3-4B-DFlash-b16), set train.sft_steps > 0, or, to run it anyway, "
                "train.allow_random_init_opd=true"
            )
        if self.learner.lr_schedule == "cosine" and not self.learner.total_steps:
            self.learner.total_steps = train.sft_steps + train.opd_steps  # the decay ends with the run
        if self.learner.lr_schedule == "cosine" and not self.learner.opd_total_steps:
            self.learner.opd_total_steps = train.opd_steps  # a fresh OPD optimizer's decay ends with OPD


def _key_paths(cls, prefix: str = "") -> list[str]:
    paths = []
    for f in fields(cls):
        path = f"{prefix}{f.name}"
        paths.append(path)
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            paths += _key_paths(type(default), path + ".")
    return paths


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, _key_paths(Config), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _normalise(overrides: list[str]) -> list[str]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. eval.num_prompts=4)")
        out.append("draft.path=" + item.split("=", 1)[1] if item.split("=", 1)[0] == "draft" else item)
    return out


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema <- YAML file <- overrides, validated into a `Config`."""
    layers = [OmegaConf.structured(Config)]
    if path is not None:
        layers.append(OmegaConf.load(config_file(path)))
    try:
        layers.append(OmegaConf.from_dotlist(_normalise(list(overrides))))
        merged = OmegaConf.merge(*layers)
        if merged.objective.preset is not None:  # above the YAML, below the command line
            preset = preset_overrides(merged.objective.preset, merged.draft.kind, merged.rollout.temperature)
            merged = OmegaConf.merge(*layers[:-1], OmegaConf.from_dotlist(preset), layers[-1])
        cfg = OmegaConf.to_object(merged)
        check_sections(cfg)
    except ConfigKeyError as err:
        key = str(getattr(err, "full_key", "") or "")
        raise ConfigError(
            f"unknown config key {key!r}{_did_you_mean(key)}; see launch/config.py for the schema"
        ) from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "?")
        raise ConfigError(f"bad config value: {str(err).splitlines()[0]} (key {key})") from None
    except ValueError as err:  # a dataclass's own validation
        raise ConfigError(f"bad config: {err}") from None
    check_benchmarks(cfg)
    check_rollout_prompts(cfg.rollout)
    check_corpus(cfg.train)
    check_rollout_records(cfg)
    return cfg


SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # installed with the package as package data


def config_file(path: str | Path) -> Path:
    """CONFIG as given if that file exists; else a shipped config named by its name (`tiny`, `configs/tiny.yaml`),
    so that an installed `draft-opd` finds its configs from any directory."""
    file = Path(path).expanduser()
    if file.is_file():
        return file
    shipped = SHIPPED_CONFIGS / f"{file.stem}.yaml"
    if file.suffix in ("", ".yaml") and file.parent in (Path("."), Path("configs")) and shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"config file not found: {file}; give a YAML path or a shipped config's name ({names})")


def check_sections(cfg: Config) -> None:
    """Impossible values of the sections whose dataclasses live with their code and do not check them.

    The buffer validates its settings when it is built: building an in-memory one here makes a bad
    value fail at load, not later inside the buffer's Ray actor.
    """
    at_least(
        "rollout",
        cfg.rollout,
        num_actors=1,
        num_prompts=1,
        max_new_tokens=1,
        temperature=0,
        topk_logprobs=0,
        threads=0,
        num_cpus=0,
        num_gpus=0,
        batch_size=1,
    )
    at_least("learner", cfg.learner, world_size=1, batch_size=1, warmup_steps=0, threads=0, num_cpus=0, num_gpus=0)
    deepspeed_config(cfg.learner)  # zero_stage, dtype
    try:
        ReplayBuffer(replace(cfg.buffer, dir=None))
    except ValueError as err:
        raise ValueError(f"buffer: {err}") from None


def _unknown_benchmark(key: str, name: str, suggest: str = "{!r}") -> ConfigError:
    known = benchmark_names()
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {suggest.format(close[0])}?)" if close else ""
    return ConfigError(f"{key}: no benchmark named {name!r}{hint}; known: {', '.join(known)}")


def check_benchmarks(cfg: Config) -> None:
    """Benchmark names are checked at load, not minutes later when the job first reads prompts."""
    known = benchmark_names()
    for name in cfg.data:
        if name not in known:
            raise _unknown_benchmark(f"data.{name}", name, suggest="data.{}")
    named = [("eval.benchmarks", n) for n in cfg.eval.benchmarks] + [("train.eval_benchmark", cfg.train.eval_benchmark)]
    for key, name in named:
        if name not in known:
            raise _unknown_benchmark(key, name)


def check_rollout_prompts(rollout: RolloutConfig) -> None:
    """A prompt file for the rollout actors is read at load, so that a bad one fails here in one line and not
    in every actor's constructor; it must hold a prompt for each actor."""
    if rollout.prompts in benchmark_names():
        count = rollout.num_prompts
    elif Path(rollout.prompts).suffix in (".json", ".jsonl"):
        try:
            count = len(load_prompts(rollout.prompts, rollout.num_prompts))
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"rollout.prompts: {err}") from None
    else:
        raise ConfigError(f"{_unknown_benchmark('rollout.prompts', rollout.prompts)}; or give a .json/.jsonl file")
    if count is not None and count < rollout.num_actors:
        raise ConfigError(
            f"rollout.prompts: {count} prompts cannot feed rollout.num_actors={rollout.num_actors} "
            "actors; lower rollout.num_actors or add prompts"
        )


def check_corpus(train: TrainSection) -> None:
    """An offline SFT corpus is found at load, not after the job started its actors."""
    if train.sft_corpus is None:
        return
    if not holds_sealed_segments(train.sft_corpus):
        raise ConfigError(
            f"train.sft_corpus={train.sft_corpus}: no corpus there; write one with "
            f"`draft-opd generate CONFIG generate.out={train.sft_corpus}`"
        )
    if train.sft_steps < 1:
        raise ConfigError(
            "train.sft_corpus is set but train.sft_steps=0: give the offline SFT phase steps, or drop train.sft_corpus"
        )


def check_rollout_records(cfg: Config) -> None:
    """Rollouts that skip the off-text pass lack the teacher of the rejected stream past a block's first mismatch:
    an objective that weighs that stream is refused at load rather than trained on a part of it."""
    if not cfg.rollout.off_text_logprobs and cfg.objective.rejected_weight > 0 and cfg.train.opd_steps > 0:
        raise ConfigError(
            f"objective.rejected_weight={cfg.objective.rejected_weight:g} reads the target's log-probs of the "
            "proposals past each block's first mismatch, which rollout.off_text_logprobs=false does not record; "
            "set rollout.off_text_logprobs=true, or objective.rejected_weight=0"
        )


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def job_main(job: Callable[[Config], Any], name: str, argv: list[str] | None = None) -> None:
    """`python -m draft_opd.launch.<name> CONFIG [key=value ...]` (what `ray job submit` runs) and `draft-opd <name>`.

    Bad input ends the process with one line naming the problem, not a traceback.
    """
    from draft_opd.speculative.pretrained import TargetNotFoundError

    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.exit(f"usage: python -m draft_opd.launch.{name} CONFIG [key=value ...]")
    try:
        job(load_config(argv[0], argv[1:]))
    except (ConfigError, TargetNotFoundError, FileNotFoundError, ValueError, TimeoutError) as err:
        sys.exit(f"draft-opd {name}: error: {one_line(err)}")


def one_line(err: BaseException) -> str:
    """`err`'s message on one line; an error raised inside a Ray actor by its own message, not Ray's traceback."""
    from ray.exceptions import RayTaskError

    while isinstance(err, RayTaskError) and isinstance(err.cause, BaseException):
        err = err.cause
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())
