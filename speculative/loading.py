"""How a run gets its drafter: the registry of kinds, a fresh one, one loaded from a directory or the hub, or none.

`DraftSpec` is the one rule for what a run drafts with: a saved draft (`path`), a fresh seeded one
(`init=random`), or none (plain decoding). Loading tells our checkpoints, z-lab DFlash and EAGLE-3
(SpecForge, vLLM) ones apart by their config.json (`speculative.formats`) and refuses, naming the
tensor, any checkpoint that does not fit the target exactly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from draft_opd.speculative.dflash import DFlashDrafter
from draft_opd.speculative.drafter import Drafter, DrafterConfig, check_mask_token, complete_config
from draft_opd.speculative.eagle3 import Eagle3Drafter
from draft_opd.speculative.formats import checkpoint_format, format_config, from_format, to_format

DRAFTERS: dict[str, type[Drafter]] = {"dflash": DFlashDrafter, "eagle3": Eagle3Drafter}


def drafter_class(kind: str) -> type[Drafter]:
    return DRAFTERS[kind]


def build_drafter(cfg: DrafterConfig, target, seed: int = 0) -> Drafter:
    """A freshly initialised drafter for `target` (seeded), sharing its embedding and LM head."""
    cfg = complete_config(cfg, target.config)
    check_mask_token(cfg, "draft.mask_token_id")
    torch.manual_seed(seed)
    drafter = drafter_class(cfg.kind)(cfg, target.embed_tokens.weight, target.lm_head)
    return drafter.to(target.dtype).eval()


HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # owner/name


def draft_dir(path: str | Path) -> Path:
    """A local draft directory, or a Hugging Face hub id fetched into (or found in) the hub cache."""
    local = Path(path).expanduser()
    if not local.is_dir() and HUB_ID.match(str(path)):
        from huggingface_hub import snapshot_download

        try:
            local = Path(snapshot_download(str(path), allow_patterns=["config.json", "model.safetensors"]))
        except (OSError, ValueError) as err:  # offline, unknown or gated repo: the same fix
            raise FileNotFoundError(
                f"draft {path} is not a local directory and the Hugging Face hub could not provide "
                f"it ({type(err).__name__}); download it where the hub is reachable "
                f"(`huggingface-cli download {path} --local-dir DIR`) and pass draft=DIR"
            ) from None
    if not (local / "config.json").exists() or not (local / "model.safetensors").exists():
        raise FileNotFoundError(
            f"no drafter at {local}: expected config.json and model.safetensors (written by "
            "`draft-opd train` or `draft-opd export`, or a z-lab DFlash / EAGLE-3 checkpoint)"
        )
    return local


def load_drafter(path: str | Path, target, block_size: int | None = None) -> Drafter:
    """Load a drafter and attach it to `target`: ours, a z-lab DFlash or an EAGLE-3 (SpecForge, vLLM) checkpoint,
    told apart by config.json (speculative/formats.py); `block_size` (given) replaces the checkpoint's."""
    root = draft_dir(path)
    config = json.loads((root / "config.json").read_text())
    tensors = load_file(str(root / "model.safetensors"))
    embedding = tensors.pop("embed_tokens.weight", None)  # older SpecForge drafts store the target's own
    try:
        fmt = checkpoint_format(config)
        if embedding is not None:
            check_embedding(embedding, target)
        cfg = format_config(fmt, config, target.num_layers, block_size)
        check_tensors(fmt, cfg, tensors, target)
        cfg, state = from_format(fmt, config, tensors, target.num_layers, block_size)
    except ValueError as err:
        raise ValueError(f"drafter at {root}: {err}") from None
    drafter = drafter_class(cfg.kind)(cfg, target.embed_tokens.weight, target.lm_head)
    drafter.load_state_dict(state)
    return drafter.to(target.dtype).eval()


def check_tensors(fmt: str, cfg: DrafterConfig, tensors: dict[str, torch.Tensor], target) -> None:
    """Refuse, naming the tensor, a checkpoint whose tensors are not exactly those of `cfg` for `target` in `fmt`:
    the expected ones are what `to_format` makes of an empty (meta) drafter, so import and export share one mapping."""
    fits = replace(cfg, hidden_size=target.hidden_size, vocab_size=target.vocab_size)
    with torch.device("meta"):
        skeleton = drafter_class(cfg.kind)(fits, torch.empty(0), nn.Linear(fits.hidden_size, fits.vocab_size))
    expected = to_format(fmt, fits, skeleton.state_dict(), target.num_layers, max_positions=0)[1]  # its config unused
    unknown, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
    if unknown:
        raise ValueError(
            f"tensor {unknown[0]}{_more(unknown)} has no place in our {cfg.kind} drafter ({fmt} format): "
            "importing it would drop part of the draft; use a plain DFlash or EAGLE-3 checkpoint"
        )
    if missing:
        raise ValueError(
            f"tensor {missing[0]}{_more(missing)} is missing: our {cfg.kind} drafter ({fmt} format, "
            f"num_hidden_layers {cfg.num_layers}) needs it"
        )
    for name, want in expected.items():
        if tuple(tensors[name].shape) != tuple(want.shape):
            raise ValueError(
                f"tensor {name} has shape {tuple(tensors[name].shape)}; this target needs "
                f"{tuple(want.shape)} (hidden {target.hidden_size}, vocab {target.vocab_size}, feature "
                f"layers {cfg.target_layer_ids}): the draft was built for a target with hidden "
                f"{cfg.hidden_size} and vocab {cfg.vocab_size}"
            )
    if cfg.vocab_size != target.vocab_size or cfg.hidden_size != target.hidden_size:
        raise ValueError(
            f"config.json says hidden {cfg.hidden_size} and vocab {cfg.vocab_size}; this target has "
            f"hidden {target.hidden_size} and vocab {target.vocab_size}: use a draft built for this "
            "target"
        )
    check_mask_token(cfg, "mask_token_id")


def check_embedding(embedding: torch.Tensor, target) -> None:
    """A stored embedding is dropped only if it is the target's own, which our drafters share."""
    own = target.embed_tokens.weight
    if embedding.shape != own.shape or not torch.equal(embedding, own.to(embedding.dtype)):
        raise ValueError(
            "tensor embed_tokens.weight is not this target's embedding, which our drafters share: "
            "the draft was trained for another target"
        )


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


@dataclass
class DraftSpec(DrafterConfig):
    """A drafter as a run configures it: a saved one (`path`), a fresh one (`init=random`), or none."""

    block_size: int | None = None  # None: a loaded draft's own (EAGLE-3: EAGLE3_BLOCK_SIZE), 16 for a fresh one
    path: str | None = None  # a draft directory or a Hugging Face hub id (ours, z-lab DFlash, EAGLE-3)
    init: str | None = None  # "random": an untrained drafter of `kind`, for smoke runs
    seed: int = 0

    def or_random(self) -> DraftSpec:
        """Rollouts, the learner and stored features always need a drafter: a spec that names none (no path, no
        init) means a seeded random one of its kind."""
        return self if self.path or self.init else replace(self, init="random")


def make_drafter(spec: DraftSpec, target) -> Drafter | None:
    """The drafter a spec asks for, attached to `target` (whose feature layers it sets), or None."""
    if spec.path:
        drafter = load_drafter(spec.path, target, spec.block_size)
    elif spec.init == "random":
        arch = {f.name: getattr(spec, f.name) for f in fields(DrafterConfig)}
        arch["block_size"] = spec.block_size or DrafterConfig.block_size
        drafter = build_drafter(DrafterConfig(**arch), target, seed=spec.seed)
    elif spec.init is None:
        return None
    else:
        raise ValueError(f"unknown draft.init {spec.init!r}; use draft.init=random or draft.path=DIR")
    try:
        target.set_feature_layers(drafter.cfg.target_layer_ids)
    except ValueError as err:  # knowable only now, with the target's depth at hand
        source = f"the drafter at {spec.path} (built for a deeper target?)" if spec.path else "draft.target_layer_ids"
        raise ValueError(f"{source}: {err}") from None
    return drafter
