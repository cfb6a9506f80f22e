"""The run configuration: one omegaconf structured schema, a YAML file per scenario, dotlist overrides.

`draft-opd eval configs/smol.yaml eval.num_prompts=4 draft.init=random` merges the schema, the
file and the overrides in that order. An unknown key is an error that names the closest valid
key; `draft=PATH` is shorthand for `draft.path=PATH`.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from actors.rollout import RolloutConfig
from benchmarks.datasets import benchmark_names
from buffer import BufferConfig
from learner.engine import LearnerConfig
from learner.objective import ObjectiveConfig
from speculative.drafter import DraftSpec
from speculative.target import TargetConfig


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class EvalSection:
    benchmarks: list[str] = field(default_factory=lambda: ["gsm8k"])
    num_prompts: int = 8
    max_new_tokens: int = 256
    temperature: float = 0.0
    warmup_tokens: int = 16  # one short untimed decode first, so lazy init does not count
    out: str | None = None  # JSON report path


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


@dataclass
class Config:
    name: str = "run"
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
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {file} (the shipped ones are in configs/)")
        layers.append(OmegaConf.load(file))
    try:
        layers.append(OmegaConf.from_dotlist(_normalise(list(overrides))))
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        key = str(getattr(err, "full_key", "") or "")
        raise ConfigError(f"unknown config key {key!r}{_did_you_mean(key)}; "
                          "see launch/config.py for the schema") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "?")
        raise ConfigError(f"bad config value: {str(err).splitlines()[0]} (key {key})") from None
    except ValueError as err:  # a dataclass's own validation
        raise ConfigError(f"bad config: {err}") from None
    check_data_keys(cfg)
    return cfg


def check_data_keys(cfg: Config) -> None:
    known = benchmark_names()
    for name in cfg.data:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean data.{close[0]}?)" if close else ""
            raise ConfigError(f"data.{name}: no benchmark named {name!r}{hint}; known: {', '.join(known)}")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def job_main(job: Callable[[Config], Any], name: str, argv: list[str] | None = None) -> None:
    """`python -m launch.<name> CONFIG [key=value ...]` (what `ray job submit` runs) and `draft-opd <name>`.

    Bad input ends the process with one line naming the problem, not a traceback.
    """
    from speculative.target import TargetNotFoundError

    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.exit(f"usage: python -m launch.{name} CONFIG [key=value ...]")
    try:
        job(load_config(argv[0], argv[1:]))
    except (ConfigError, TargetNotFoundError, FileNotFoundError, ValueError) as err:
        sys.exit(f"draft-opd {name}: error: {err}")
