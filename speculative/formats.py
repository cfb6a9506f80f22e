"""Serving formats: our drafter as the Hugging Face checkpoints that SGLang and vLLM load.

- `dflash`: z-lab's `DFlashDraftModel` (Qwen3 decoder layers with QK-norm, `fc` + `hidden_norm` over
  the concatenated target features, a `dflash_config` with `target_layer_ids` and `mask_token_id`).
  Our module is that model: the weight names are the same and need no renaming.
- `eagle3`: `LlamaForCausalLMEagle3` (SafeAILab EAGLE-3 as trained by SpecForge): one `midlayer`,
  `fc` over three target layers, its own `lm_head` over the draft vocabulary, `d2t` stored as offsets
  (target id = draft id + d2t[draft id]) and `t2d` as a mask over the target vocabulary.

Neither format holds the embedding or, for DFlash, the LM head: the servers take them from the
target, as our drafters do. A format is written only where it computes what our drafter computes;
`serving_blockers` names what differs otherwise. Sources: z-lab/dflash `dflash/model.py`; SGLang
`python/sglang/srt/models/{dflash,llama_eagle3}.py`; vLLM `vllm/model_executor/models/
{qwen3_dflash,llama_eagle3}.py`; SpecForge `configs/qwen3-8b-{dflash,eagle3}.json`.
"""

from __future__ import annotations

import torch

from speculative.drafter import DrafterConfig

FORMATS = ("dflash", "eagle3")  # one per drafter kind, named after it
EAGLE3_FEATURE_LAYERS = 3  # SGLang and vLLM build fc as Linear(3 * target_hidden, hidden)

State = dict[str, torch.Tensor]


def serving_blockers(cfg: DrafterConfig) -> list[str]:
    """What keeps `cfg` from its serving format exactly (empty when the mapping is exact)."""
    blockers = []
    ids = cfg.target_layer_ids
    if ids != sorted(set(ids)):
        blockers.append(f"target_layer_ids {ids} are not strictly ascending: the servers capture target layers "
                        "in depth order, so the fc input would be permuted")
    if cfg.kind == "eagle3" and len(ids) != EAGLE3_FEATURE_LAYERS:
        blockers.append(f"this draft fuses {len(ids)} target layers; the EAGLE-3 loaders of SGLang and vLLM "
                        f"fix fc at {EAGLE3_FEATURE_LAYERS} x hidden inputs")
    if cfg.kind == "dflash" and cfg.mask_token_id is None:
        blockers.append("a DFlash checkpoint needs mask_token_id")
    return blockers


def _common_config(cfg: DrafterConfig, max_positions: int, dtype: torch.dtype) -> dict:
    """Fields both formats share, in the HF names; rope is plain (no scaling), as in our drafters."""
    return {
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.rms_norm_eps, "hidden_act": "silu",
        "attention_bias": False, "attention_dropout": 0.0, "max_position_embeddings": max_positions,
        # transformers < 5 and the servers read rope_theta; transformers 5 reads rope_parameters
        "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _require_exact(cfg: DrafterConfig, kind: str) -> None:
    if cfg.kind != kind:
        raise ValueError(f"a {cfg.kind} drafter has no {kind} format; it exports to {cfg.kind}")
    blockers = serving_blockers(cfg)
    if blockers:
        raise ValueError(f"the {kind} format would not compute what this draft computes: " + "; ".join(blockers))


def to_dflash(cfg: DrafterConfig, state: State, num_target_layers: int, max_positions: int
              ) -> tuple[dict, State]:
    """z-lab `DFlashDraftModel`: our names already are its names; the config is a Qwen3 one plus dflash fields."""
    _require_exact(cfg, "dflash")
    config = {
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3",
        "num_hidden_layers": cfg.num_layers, "block_size": cfg.block_size,
        "dflash_config": {"mask_token_id": cfg.mask_token_id, "target_layer_ids": list(cfg.target_layer_ids)},
        "num_target_layers": num_target_layers,  # SGLang bounds target_layer_ids by it
        # all layers full, non-causal attention (vLLM reads causality from layer_types)
        "layer_types": ["full_attention"] * cfg.num_layers, "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": cfg.num_layers,
        **_common_config(cfg, max_positions, state["fc.weight"].dtype),
    }
    return config, {name: t.contiguous() for name, t in state.items()}


def from_dflash(config: dict, state: State) -> tuple[DrafterConfig, State]:
    """The inverse of `to_dflash` (also reads z-lab's released DFlash drafts)."""
    dflash = config["dflash_config"]
    cfg = DrafterConfig(kind="dflash", block_size=int(config["block_size"]), num_layers=int(config["num_hidden_layers"]),
                        target_layer_ids=list(dflash["target_layer_ids"]), mask_token_id=dflash.get("mask_token_id"),
                        **_native_fields(config))
    return cfg, dict(state)


def _eagle3_name(ours: str) -> str:
    """layer.{q,k,v,o}_proj -> midlayer.self_attn.*; other layer.* -> midlayer.*; the rest keep their names."""
    if not ours.startswith("layer."):
        return ours
    rest = ours.removeprefix("layer.")
    return "midlayer." + ("self_attn." + rest if rest.split(".")[0] in ("q_proj", "k_proj", "v_proj", "o_proj") else rest)


def to_eagle3(cfg: DrafterConfig, state: State, max_positions: int) -> tuple[dict, State]:
    """`LlamaForCausalLMEagle3`; our absolute draft-to-target ids become offsets (d2t) and a target mask (t2d)."""
    _require_exact(cfg, "eagle3")
    ids = list(cfg.target_layer_ids)
    draft_to_target = state["d2t"]
    config = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "num_hidden_layers": 1,
        "draft_vocab_size": int(draft_to_target.numel()),
        # SGLang reads eagle_config's ids as layer outputs (it adds 1); vLLM reads the top-level ids
        # as layer inputs (eagle3_utils adds 1 to DFlash's ids to get them). Same layers, both spelled.
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": ids},
        "eagle_aux_hidden_state_layer_ids": [i + 1 for i in ids],
        **_common_config(cfg, max_positions, state["fc.weight"].dtype),
    }
    out = {_eagle3_name(name): t.contiguous() for name, t in state.items() if name != "d2t"}
    out["d2t"] = (draft_to_target - torch.arange(draft_to_target.numel())).to(torch.int64)
    t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    t2d[draft_to_target] = True
    out["t2d"] = t2d
    return config, out


def from_eagle3(config: dict, state: State, block_size: int) -> tuple[DrafterConfig, State]:
    """The inverse of `to_eagle3`; the format has no block size (a server flag), so it is given."""
    ids = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if ids is None:
        raise ValueError("no eagle_config.eagle_aux_hidden_state_layer_ids in this EAGLE-3 config: "
                         "the target layers it reads are unknown")
    draft_vocab = int(config.get("draft_vocab_size") or config["vocab_size"])
    cfg = DrafterConfig(kind="eagle3", block_size=block_size, num_layers=1, target_layer_ids=list(ids),
                        draft_vocab_size=None if draft_vocab == int(config["vocab_size"]) else draft_vocab,
                        **_native_fields(config))
    back = {_eagle3_name(name): name for name in _eagle3_native_names()}
    unknown = sorted(set(state) - set(back) - {"d2t", "t2d"})
    if unknown:
        raise ValueError(f"EAGLE-3 tensors our drafter has no place for: {unknown} (an embed_tokens.weight must be "
                         "the target's own embedding, which our drafter shares; drop it)")
    out = {back[name]: t for name, t in state.items() if name in back}
    out["d2t"] = state["d2t"].to(torch.int64) + torch.arange(draft_vocab)
    return cfg, out


def _eagle3_native_names() -> list[str]:
    layer = ["input_layernorm", "hidden_norm", "q_proj", "k_proj", "v_proj", "o_proj", "post_attention_layernorm",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    return ["fc.weight", "norm.weight", "lm_head.weight"] + [f"layer.{name}.weight" for name in layer]


def _native_fields(config: dict) -> dict:
    rope = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")
    return {"hidden_size": int(config["hidden_size"]), "intermediate_size": int(config["intermediate_size"]),
            "num_heads": int(config["num_attention_heads"]), "num_kv_heads": int(config["num_key_value_heads"]),
            "head_dim": int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]),
            "vocab_size": int(config["vocab_size"]), "rms_norm_eps": float(config["rms_norm_eps"]),
            "rope_theta": float(rope)}
