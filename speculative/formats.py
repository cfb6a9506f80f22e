"""Serving formats: our drafter as the Hugging Face checkpoints that SGLang and vLLM load.

- `dflash`: z-lab's `DFlashDraftModel` (Qwen3 decoder layers with QK-norm, `fc` + `hidden_norm` over
  the concatenated target features, a `dflash_config` with `target_layer_ids` and `mask_token_id`).
  Our module is that model: the weight names are the same and need no renaming.
- `eagle3`: `LlamaForCausalLMEagle3` (SafeAILab EAGLE-3 as trained by SpecForge): one `midlayer`,
  `fc` over three target layers, its own `lm_head` over the draft vocabulary, `d2t` stored as offsets
  (target id = draft id + d2t[draft id]) and `t2d` as a mask over the target vocabulary.

Neither format holds the embedding or, for DFlash, the LM head: the servers take them from the
target, as our drafters do. A format is written only where it computes what our drafter computes;
`serving_blockers` names what differs otherwise. The same mappings read such checkpoints back
(`from_format`, used by `load_drafter`), refusing any that use a feature our drafters lack.
Sources: z-lab/dflash `dflash/model.py`; SGLang `python/sglang/srt/models/{dflash,llama_eagle3}.py`;
vLLM `vllm/model_executor/models/{qwen3_dflash,llama_eagle3}.py`; SpecForge
`specforge/modeling/draft/llama3_eagle.py`, `configs/qwen3-{4b,8b}-{dflash,eagle3}.json`.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from draft_opd.speculative.drafter import DrafterConfig, default_layer_ids, native_config, read_native_config

FORMATS = ("dflash", "eagle3")  # one per drafter kind, named after it
NATIVE = "draft_opd"  # our own checkpoints (`Drafter.save`), named by config.json's "architecture"
ARCHITECTURES = {"DFlashDraftModel": "dflash", "LlamaForCausalLMEagle3": "eagle3", "Eagle3LlamaForCausalLM": "eagle3"}
EAGLE3_FEATURE_LAYERS = 3  # SGLang and vLLM build fc as Linear(3 * target_hidden, hidden)
EAGLE3_BLOCK_SIZE = 8  # an EAGLE-3 checkpoint has no block size (a server flag); SpecForge trains 7-step chains
DFLASH_BLOCK_SIZE = 16  # z-lab's default for a DFlash config without one

State = dict[str, torch.Tensor]


def serving_blockers(cfg: DrafterConfig) -> list[str]:
    """What keeps `cfg` from its serving format exactly (empty when the mapping is exact)."""
    blockers = []
    ids = cfg.target_layer_ids
    if ids != sorted(set(ids)):
        blockers.append(
            f"target_layer_ids {ids} are not strictly ascending: the servers capture target layers "
            "in depth order, so the fc input would be permuted"
        )
    if cfg.kind == "eagle3" and len(ids) != EAGLE3_FEATURE_LAYERS:
        blockers.append(
            f"this draft fuses {len(ids)} target layers; the EAGLE-3 loaders of SGLang and vLLM "
            f"fix fc at {EAGLE3_FEATURE_LAYERS} x hidden inputs"
        )
    if cfg.kind == "dflash" and cfg.mask_token_id is None:
        blockers.append("a DFlash checkpoint needs mask_token_id")
    return blockers


def _common_config(cfg: DrafterConfig, max_positions: int, dtype: torch.dtype) -> dict:
    """Fields both formats share, in the HF names; rope is plain (no scaling), as in our drafters."""
    return {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "max_position_embeddings": max_positions,
        # transformers < 5 and the servers read rope_theta; transformers 5 reads rope_parameters
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _require_exact(cfg: DrafterConfig, kind: str) -> None:
    if cfg.kind != kind:
        raise ValueError(f"a {cfg.kind} drafter has no {kind} format; it exports to {cfg.kind}")
    blockers = serving_blockers(cfg)
    if blockers:
        raise ValueError(f"the {kind} format would not compute what this draft computes: " + "; ".join(blockers))


def to_dflash(cfg: DrafterConfig, state: State, num_target_layers: int, max_positions: int) -> tuple[dict, State]:
    """z-lab `DFlashDraftModel`: our names already are its names; the config is a Qwen3 one plus dflash fields."""
    _require_exact(cfg, "dflash")
    config = {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "num_hidden_layers": cfg.num_layers,
        "block_size": cfg.block_size,
        "dflash_config": {"mask_token_id": cfg.mask_token_id, "target_layer_ids": list(cfg.target_layer_ids)},
        "num_target_layers": num_target_layers,  # SGLang bounds target_layer_ids by it
        # all layers full, non-causal attention (vLLM reads causality from layer_types)
        "layer_types": ["full_attention"] * cfg.num_layers,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_layers,
        **_common_config(cfg, max_positions, state["fc.weight"].dtype),
    }
    return config, {name: t.contiguous() for name, t in state.items()}


def from_dflash(config: dict, state: State) -> tuple[DrafterConfig, State]:
    """The inverse of `to_dflash` (also reads z-lab's released DFlash drafts)."""
    return _dflash_config(config, None), dict(state)


def _dflash_config(config: dict, num_target_layers: int | None) -> DrafterConfig:
    dflash = config.get("dflash_config") or {}
    built_for = config.get("num_target_layers")
    if num_target_layers is not None and built_for not in (None, num_target_layers):
        raise ValueError(
            f"this DFlash draft was built for a {built_for}-layer target (num_target_layers); this target "
            f"has {num_target_layers} layers: use a draft made for this target"
        )
    if "target_layer_ids" not in dflash:
        raise ValueError(
            "no dflash_config.target_layer_ids in this DFlash config: the target layers it reads are unknown"
        )
    _refuse_unsupported(
        "DFlash",
        config,
        [
            ("causal attention (is_causal)", bool(_dflash_field(config, "is_causal"))),
            ("input_embedding_scale", _dflash_field(config, "input_embedding_scale") not in (None, 1, 1.0)),
            ("output_multiplier", _dflash_field(config, "output_multiplier") not in (None, 1, 1.0)),
            ("final_logit_softcapping", bool(_dflash_field(config, "final_logit_softcapping"))),
        ],
    )
    return DrafterConfig(
        kind="dflash",
        block_size=int(_dflash_field(config, "block_size") or DFLASH_BLOCK_SIZE),
        num_layers=int(config["num_hidden_layers"]),
        target_layer_ids=list(dflash["target_layer_ids"]),
        mask_token_id=dflash.get("mask_token_id"),
        **_native_fields(config),
    )


def _dflash_field(config: dict, name: str):
    """z-lab's lookup: dflash_config first, then the top level."""
    return (config.get("dflash_config") or {}).get(name, config.get(name))


def _refuse_unsupported(fmt: str, config: dict, specific: list[tuple[str, bool]]) -> None:
    """Refuse a checkpoint that uses a feature our drafters do not compute: importing it would change its outputs."""
    rope = config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or (config.get("rope_parameters") or {}).get("rope_type")
    layer_types = config.get("layer_types") or []
    common = [
        ("attention_bias", bool(config.get("attention_bias"))),
        (f"rope scaling ({rope_type})", rope_type not in (None, "default")),
        (
            "sliding-window attention",
            bool(config.get("use_sliding_window")) or any(t != "full_attention" for t in layer_types),
        ),
    ]
    used = [name for name, present in common + specific if present]
    if used:
        raise ValueError(
            f"this {fmt} checkpoint uses {', '.join(used)}, which our drafters do not compute; "
            "importing it would change what it drafts, so it is refused"
        )


def _eagle3_name(ours: str) -> str:
    """layer.{q,k,v,o}_proj -> midlayer.self_attn.*; other layer.* -> midlayer.*; the rest keep their names."""
    if not ours.startswith("layer."):
        return ours
    rest = ours.removeprefix("layer.")
    return "midlayer." + (
        "self_attn." + rest if rest.split(".")[0] in ("q_proj", "k_proj", "v_proj", "o_proj") else rest
    )


def to_eagle3(cfg: DrafterConfig, state: State, max_positions: int) -> tuple[dict, State]:
    """`LlamaForCausalLMEagle3`; our absolute draft-to-target ids become offsets (d2t) and a target mask (t2d)."""
    _require_exact(cfg, "eagle3")
    ids = list(cfg.target_layer_ids)
    draft_to_target = state["d2t"]
    device = draft_to_target.device  # meta tensors too: `load_drafter` derives expected shapes from them
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "num_hidden_layers": 1,
        "draft_vocab_size": int(draft_to_target.numel()),
        # SGLang reads eagle_config's ids as layer outputs (it adds 1); vLLM reads the top-level ids
        # as layer inputs (eagle3_utils adds 1 to DFlash's ids to get them). Same layers, both spelled.
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": ids},
        "eagle_aux_hidden_state_layer_ids": [i + 1 for i in ids],
        **_common_config(cfg, max_positions, state["fc.weight"].dtype),
    }
    out = {_eagle3_name(name): t.contiguous() for name, t in state.items() if name != "d2t"}
    out["d2t"] = (draft_to_target - torch.arange(draft_to_target.numel(), device=device)).to(torch.int64)
    t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool, device=device)
    t2d[draft_to_target] = True
    out["t2d"] = t2d
    return config, out


def from_eagle3(
    config: dict, state: State, block_size: int, num_target_layers: int | None = None
) -> tuple[DrafterConfig, State]:
    """The inverse of `to_eagle3` (also reads SpecForge's and vLLM's EAGLE-3 drafts); the format has no block size
    (a server flag), so it is given, and the target's depth gives the servers' default feature layers. Tensor
    names and shapes are checked by `load_drafter`, which knows the target."""
    return _eagle3_config(config, block_size, num_target_layers), _eagle3_state(state)


def _eagle3_state(state: State) -> State:
    back = {_eagle3_name(name): name for name in _eagle3_native_names()}
    out = {back[name]: t for name, t in state.items() if name in back}
    out["d2t"] = state["d2t"].to(torch.int64) + torch.arange(state["d2t"].numel())
    return out


def _eagle3_config(config: dict, block_size: int, num_target_layers: int | None) -> DrafterConfig:
    _refuse_unsupported(
        "EAGLE-3",
        config,
        [
            ("norm_before_residual", bool(config.get("norm_before_residual"))),
            (
                "a target_hidden_size other than hidden_size",
                config.get("target_hidden_size") not in (None, config.get("hidden_size")),
            ),
            (
                f"{config.get('num_hidden_layers')} decoder layers (EAGLE-3 has 1)",
                int(config.get("num_hidden_layers", 1)) != 1,
            ),
        ],
    )
    draft_vocab = int(config.get("draft_vocab_size") or config["vocab_size"])
    return DrafterConfig(
        kind="eagle3",
        block_size=block_size,
        num_layers=1,
        target_layer_ids=_eagle3_layer_ids(config, num_target_layers),
        draft_vocab_size=None if draft_vocab == int(config["vocab_size"]) else draft_vocab,
        **_native_fields(config),
    )


def _eagle3_layer_ids(config: dict, num_target_layers: int | None) -> list[int]:
    """SGLang's eagle_config ids (layer outputs), else vLLM's top-level ones (layer inputs: ids + 1), else the
    layers both servers capture when a checkpoint names none ([1, L//2 - 1, L - 4] as outputs)."""
    sglang = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    vllm = config.get("eagle_aux_hidden_state_layer_ids")
    if sglang:
        return list(sglang)
    if vllm:
        return [i - 1 for i in vllm]
    if num_target_layers is None:
        raise ValueError(
            "no eagle_aux_hidden_state_layer_ids in this EAGLE-3 config and no target depth for the "
            "servers' default: the target layers it reads are unknown"
        )
    return default_layer_ids("eagle3", num_target_layers, 1)


def _eagle3_native_names() -> list[str]:
    layer = [
        "input_layernorm",
        "hidden_norm",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "post_attention_layernorm",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    return ["fc.weight", "norm.weight", "lm_head.weight"] + [f"layer.{name}.weight" for name in layer]


def checkpoint_format(config: dict) -> str:
    """The format of a draft checkpoint, from its config.json: ours (NATIVE), `dflash` or `eagle3`."""
    if config.get("architecture") == NATIVE:
        return NATIVE
    known = [ARCHITECTURES[name] for name in config.get("architectures") or [] if name in ARCHITECTURES]
    if not known:
        raise ValueError(
            f"config.json names architectures {config.get('architectures')}, not a draft this repository "
            "reads: pass one saved by draft-opd train/export, a z-lab DFlashDraftModel or an EAGLE-3 "
            "LlamaForCausalLMEagle3 (SpecForge, vLLM) checkpoint"
        )
    return known[0]


def to_format(
    fmt: str, cfg: DrafterConfig, state: State, num_target_layers: int, max_positions: int
) -> tuple[dict, State]:
    """Our drafter as a checkpoint of `fmt` (NATIVE: as `Drafter.save` writes it)."""
    if fmt == NATIVE:
        return native_config(cfg), dict(state)
    if fmt == "dflash":
        return to_dflash(cfg, state, num_target_layers, max_positions)
    return to_eagle3(cfg, state, max_positions)


def format_config(fmt: str, config: dict, num_target_layers: int, block_size: int | None = None) -> DrafterConfig:
    """The drafter a config.json of `fmt` describes; `block_size` (given) replaces its own, and EAGLE-3's, which
    the format lacks, defaults to EAGLE3_BLOCK_SIZE."""
    if fmt == NATIVE:
        cfg = read_native_config(config)
    elif fmt == "dflash":
        cfg = _dflash_config(config, num_target_layers)
    else:
        cfg = _eagle3_config(config, EAGLE3_BLOCK_SIZE, num_target_layers)
    return replace(cfg, block_size=block_size) if block_size else cfg


def from_format(
    fmt: str, config: dict, state: State, num_target_layers: int, block_size: int | None = None
) -> tuple[DrafterConfig, State]:
    """A checkpoint of `fmt` as our drafter (config as `format_config`, weights in our names)."""
    cfg = format_config(fmt, config, num_target_layers, block_size)
    return cfg, (_eagle3_state(state) if fmt == "eagle3" else dict(state))


def _native_fields(config: dict) -> dict:
    rope = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")
    return {
        "hidden_size": int(config["hidden_size"]),
        "intermediate_size": int(config["intermediate_size"]),
        "num_heads": int(config["num_attention_heads"]),
        "num_kv_heads": int(config["num_key_value_heads"]),
        "head_dim": int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]),
        "vocab_size": int(config["vocab_size"]),
        "rms_norm_eps": float(config["rms_norm_eps"]),
        "rope_theta": float(rope),
    }
