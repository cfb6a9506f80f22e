"""`draft=PATH` imports published drafts: z-lab DFlash and EAGLE-3 (SpecForge / vLLM) checkpoints, local or by hub id.

The checkpoints here are written by hand, tensor by tensor, in the names of the formats' own sources (z-lab/dflash
`dflash/model.py`: DFlashDraftModel; sgl-project/SpecForge `specforge/modeling/draft/llama3_eagle.py`:
LlamaForCausalLMEagle3, `configs/qwen3-4b-{dflash,eagle3}.json`), not by our exporter.
"""

import json

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file

from draft_opd.launch.cli import main
from draft_opd.launch.config import load_config
from draft_opd.launch.eval import run_eval
from draft_opd.launch.export import export
from draft_opd.speculative.drafter import DrafterConfig
from draft_opd.speculative.formats import EAGLE3_BLOCK_SIZE
from draft_opd.speculative.loading import DraftSpec, build_drafter, load_drafter, make_drafter
from draft_opd.speculative.target import Target
from draft_opd.speculative.testbeds import tiny_model
from tests.conftest import TINY_FEATURE_LAYERS, TINY_MASK
from tests.test_export import make_run, trained

DRAFT_VOCAB = 200
# HF bookkeeping the published configs carry and our drafters do not use (EAGLE-3's are Qwen3 leftovers that
# SpecForge's LlamaConfig ignores); everything else must survive import -> export unchanged
METADATA = {
    "auto_map",
    "bos_token_id",
    "eos_token_id",
    "initializer_range",
    "transformers_version",
    "use_cache",
    "dtype",
}
EAGLE3_LEFTOVERS = {"max_window_layers", "sliding_window", "use_sliding_window"}


def source_drafter(target, kind: str, layers=TINY_FEATURE_LAYERS, seed: int = 3):
    """A drafter moved off its init (so a loader that re-initialises is caught); EAGLE-3 gets a shuffled reduced
    vocabulary, so that its d2t offsets matter."""
    cfg = DrafterConfig(
        kind=kind,
        block_size=8,
        num_layers=2 if kind == "dflash" else 1,
        target_layer_ids=layers,
        mask_token_id=TINY_MASK if kind == "dflash" else None,
        draft_vocab_size=DRAFT_VOCAB if kind == "eagle3" else None,
    )
    drafter = build_drafter(cfg, target, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
        if kind == "eagle3":
            drafter.d2t.copy_(torch.randperm(target.vocab_size, generator=generator)[:DRAFT_VOCAB])
    return drafter.eval()


def qwen3_fields(cfg: DrafterConfig, num_layers: int, target) -> dict:
    """The Qwen3/Llama fields of the published configs, at the source drafter's sizes."""
    return {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 256,
        "eos_token_id": 258,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": target.config.max_position_embeddings,
        "max_window_layers": num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": cfg.num_kv_heads,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": cfg.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "transformers_version": "4.57.3",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": cfg.vocab_size,
    }


def write(directory, config: dict, tensors: dict):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file(
        {k: v.detach().contiguous() for k, v in tensors.items()},
        str(directory / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return directory


def zlab_dflash(directory, drafter, target, **changes):
    """z-lab's DFlashDraftModel: `layers.i.{self_attn,mlp}.*` Qwen3 layers with q/k norms, `fc`, `hidden_norm`,
    `norm`; dflash_config {mask_token_id, target_layer_ids}; no embedding, no LM head (the target's)."""
    cfg = drafter.cfg
    config = {
        "architectures": ["DFlashDraftModel"],
        "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "block_size": 16,
        "dflash_config": {"mask_token_id": cfg.mask_token_id, "target_layer_ids": list(cfg.target_layer_ids)},
        "dtype": "float32",
        "layer_types": ["full_attention"] * cfg.num_layers,
        "model_type": "qwen3",
        "num_target_layers": target.num_layers,
        **qwen3_fields(cfg, cfg.num_layers, target),
    }
    tensors = {
        "fc.weight": drafter.fc.weight,
        "hidden_norm.weight": drafter.hidden_norm.weight,
        "norm.weight": drafter.norm.weight,
    }
    for i, layer in enumerate(drafter.layers):
        attn, mlp = layer.self_attn, layer.mlp
        tensors |= {
            f"layers.{i}.input_layernorm.weight": layer.input_layernorm.weight,
            f"layers.{i}.post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
            f"layers.{i}.self_attn.q_proj.weight": attn.q_proj.weight,
            f"layers.{i}.self_attn.k_proj.weight": attn.k_proj.weight,
            f"layers.{i}.self_attn.v_proj.weight": attn.v_proj.weight,
            f"layers.{i}.self_attn.o_proj.weight": attn.o_proj.weight,
            f"layers.{i}.self_attn.q_norm.weight": attn.q_norm.weight,
            f"layers.{i}.self_attn.k_norm.weight": attn.k_norm.weight,
            f"layers.{i}.mlp.gate_proj.weight": mlp.gate_proj.weight,
            f"layers.{i}.mlp.up_proj.weight": mlp.up_proj.weight,
            f"layers.{i}.mlp.down_proj.weight": mlp.down_proj.weight,
        }
    return write(directory, config | changes, tensors)


def specforge_eagle3(directory, drafter, target, layer_ids: str = "sglang", **changes):
    """SpecForge's LlamaForCausalLMEagle3: one `midlayer` (hidden_norm, input_layernorm, self_attn over 2H,
    post_attention_layernorm, mlp), `fc`, `norm`, `lm_head` over the draft vocabulary, `d2t` offsets
    (target = draft + d2t) and a `t2d` mask. Feature layers as SGLang's eagle_config spells them (outputs),
    as vLLM's top-level field does (inputs, +1), or not at all (the servers' default)."""
    cfg, layer = drafter.cfg, drafter.layer
    ids = {
        "sglang": {"eagle_config": {"eagle_aux_hidden_state_layer_ids": list(cfg.target_layer_ids)}},
        "vllm": {"eagle_aux_hidden_state_layer_ids": [i + 1 for i in cfg.target_layer_ids]},
        "none": {},
    }[layer_ids]
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "torch_dtype": "float32",
        "draft_vocab_size": DRAFT_VOCAB,
        **qwen3_fields(cfg, 1, target),
        **ids,
    }
    t2d = torch.zeros(target.vocab_size, dtype=torch.bool)
    t2d[drafter.d2t] = True
    tensors = {
        "fc.weight": drafter.fc.weight,
        "norm.weight": drafter.norm.weight,
        "lm_head.weight": drafter.lm_head.weight,
        "d2t": drafter.d2t - torch.arange(DRAFT_VOCAB),
        "t2d": t2d,
        "midlayer.hidden_norm.weight": layer.hidden_norm.weight,
        "midlayer.input_layernorm.weight": layer.input_layernorm.weight,
        "midlayer.post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
        "midlayer.self_attn.q_proj.weight": layer.q_proj.weight,
        "midlayer.self_attn.k_proj.weight": layer.k_proj.weight,
        "midlayer.self_attn.v_proj.weight": layer.v_proj.weight,
        "midlayer.self_attn.o_proj.weight": layer.o_proj.weight,
        "midlayer.mlp.gate_proj.weight": layer.mlp.gate_proj.weight,
        "midlayer.mlp.up_proj.weight": layer.mlp.up_proj.weight,
        "midlayer.mlp.down_proj.weight": layer.mlp.down_proj.weight,
    }
    return write(directory, config | changes, tensors)


CHECKPOINT = {"dflash": zlab_dflash, "eagle3": specforge_eagle3}


def proposals(drafter, target) -> torch.Tensor:
    prompt = torch.tensor(list(range(40, 60)))
    state = drafter.begin(target.forward(prompt, 0, None).features, prompt)
    return drafter.propose(state, torch.tensor(7), len(prompt), 7, lambda x: x.argmax(-1))[1]


@pytest.fixture(scope="module")
def deep_target():
    """8 layers: the EAGLE-3 servers' default feature layers [1, L//2 - 1, L - 4] are distinct only from L = 7."""
    return Target(tiny_model(num_hidden_layers=8), None, [1, 3, 4])


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_imported_checkpoint_gives_the_source_drafters_logits(tiny_target, tmp_path, kind):
    source = source_drafter(tiny_target, kind)
    imported = load_drafter(CHECKPOINT[kind](tmp_path, source, tiny_target), tiny_target)
    assert type(imported) is type(source)
    assert torch.equal(proposals(imported, tiny_target), proposals(source, tiny_target))
    for name, tensor in source.state_dict().items():
        assert torch.equal(imported.state_dict()[name], tensor), name
    assert imported.cfg.target_layer_ids == TINY_FEATURE_LAYERS
    assert imported.cfg.block_size == (16 if kind == "dflash" else EAGLE3_BLOCK_SIZE)


@pytest.mark.parametrize("spelling", ["sglang", "vllm", "none"])
def test_eagle3_feature_layers_in_every_spelling(deep_target, tmp_path, spelling):
    source = source_drafter(deep_target, "eagle3", layers=[1, 3, 4])  # 8 layers: [1, 8 // 2 - 1, 8 - 4]
    imported = load_drafter(specforge_eagle3(tmp_path, source, deep_target, spelling), deep_target)
    assert imported.cfg.target_layer_ids == [1, 3, 4]
    assert torch.equal(proposals(imported, deep_target), proposals(source, deep_target))


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_import_then_export_round_trips_byte_for_byte(tiny_target, tmp_path, kind):
    block = {"block_size": 8} if kind == "dflash" else {}  # EAGLE-3's is a server flag: 8 by default
    checkpoint = CHECKPOINT[kind](tmp_path / "published", source_drafter(tiny_target, kind), tiny_target, **block)
    imported = load_drafter(checkpoint, tiny_target)
    result = export(make_run(tmp_path, imported), tmp_path / "out")
    assert result.formats == [kind]
    written = result.out_dir / kind
    assert (written / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()
    ours, theirs = (json.loads((d / "config.json").read_text()) for d in (written, checkpoint))
    ignored = METADATA | (EAGLE3_LEFTOVERS if kind == "eagle3" else set())
    assert {k: v for k, v in theirs.items() if k not in ignored} == {k: ours[k] for k in theirs if k not in ignored}


def test_block_size_is_the_checkpoints_unless_given(tiny_target, tmp_path):
    dflash = zlab_dflash(tmp_path / "d", source_drafter(tiny_target, "dflash"), tiny_target)
    eagle3 = specforge_eagle3(tmp_path / "e", source_drafter(tiny_target, "eagle3"), tiny_target)
    assert load_drafter(dflash, tiny_target).cfg.block_size == 16
    assert load_drafter(eagle3, tiny_target).cfg.block_size == EAGLE3_BLOCK_SIZE == 8
    spec = load_config("configs/tiny.yaml", [f"draft={eagle3}", "draft.block_size=5"]).draft
    assert make_drafter(spec, tiny_target).cfg.block_size == 5
    assert make_drafter(DraftSpec(path=str(dflash), block_size=4), tiny_target).cfg.block_size == 4


def test_a_stored_copy_of_the_targets_embedding_is_accepted(tiny_target, tmp_path):
    """Older SpecForge drafts store the (frozen) target embedding; one that is not the target's is refused."""
    source = source_drafter(tiny_target, "eagle3")
    checkpoint = specforge_eagle3(tmp_path, source, tiny_target)
    tensors = load_file(str(checkpoint / "model.safetensors"))
    save_file(
        tensors | {"embed_tokens.weight": tiny_target.embed_tokens.weight.detach()},
        str(checkpoint / "model.safetensors"),
    )
    assert torch.equal(proposals(load_drafter(checkpoint, tiny_target), tiny_target), proposals(source, tiny_target))
    save_file(
        tensors | {"embed_tokens.weight": tiny_target.embed_tokens.weight.detach() + 1},
        str(checkpoint / "model.safetensors"),
    )
    with pytest.raises(ValueError, match="tensor embed_tokens.weight is not this target's embedding"):
        load_drafter(checkpoint, tiny_target)


def resave(checkpoint, change) -> None:
    tensors = load_file(str(checkpoint / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(checkpoint / "model.safetensors"))


def narrow_target():
    return Target(tiny_model(hidden_size=32, head_dim=8), None, TINY_FEATURE_LAYERS)


def other_vocab_target():
    return Target(tiny_model(vocab_size=300), None, TINY_FEATURE_LAYERS)


@pytest.mark.parametrize(
    "kind, change, config, target, message",
    [
        (
            "dflash",
            lambda t: t.update({"layers.0.self_attn.extra.weight": torch.zeros(4)}),
            {},
            None,
            r"tensor layers.0.self_attn.extra.weight has no place in our dflash drafter \(dflash format\)",
        ),
        (
            "eagle3",
            lambda t: t.update({"midlayer.self_attn.rotary_emb.inv_freq": torch.zeros(8)}),
            {},
            None,
            r"tensor midlayer.self_attn.rotary_emb.inv_freq has no place in our eagle3 drafter",
        ),
        (
            "eagle3",
            lambda t: t.pop("midlayer.mlp.up_proj.weight"),
            {},
            None,
            r"tensor midlayer.mlp.up_proj.weight is missing: our eagle3 drafter \(eagle3 format, num_hidden_layers 1\) "
            r"needs it",
        ),
        (
            "dflash",
            lambda t: t.pop("layers.1.self_attn.k_norm.weight"),
            {},
            None,
            r"tensor layers.1.self_attn.k_norm.weight is missing",
        ),
        ("dflash", None, {"num_hidden_layers": 3}, None, r"tensor layers.2.\S+ \(and 10 more\) is missing"),
        (
            "dflash",
            None,
            {},
            narrow_target,
            r"tensor fc.weight has shape \(64, 192\); this target needs \(32, 96\) \(hidden 32, vocab 320, "
            r"feature layers "
            r"\[0, 1, 2\]\): the draft was built for a target with hidden 64",
        ),
        ("eagle3", None, {}, narrow_target, r"tensor fc.weight has shape \(64, 192\); this target needs \(32, 96\)"),
        (
            "dflash",
            None,
            {"dflash_config": {"mask_token_id": TINY_MASK, "target_layer_ids": [0, 2]}},
            None,
            r"tensor fc.weight has shape \(64, 192\); this target needs \(64, 128\) \(hidden 64, vocab 320, "
            r"feature layers "
            r"\[0, 2\]\)",
        ),
        ("eagle3", None, {}, other_vocab_target, r"tensor t2d has shape \(320,\); this target needs \(300,\)"),
        (
            "dflash",
            None,
            {},
            other_vocab_target,
            r"config.json says hidden 64 and vocab 320; this target has hidden 64 "
            r"and vocab 300",
        ),
        (
            "dflash",
            None,
            {"num_target_layers": 36},
            None,
            r"this DFlash draft was built for a 36-layer target \(num_target_layers\); this target has 4 layers",
        ),
        (
            "dflash",
            None,
            {"dflash_config": {"mask_token_id": 320, "target_layer_ids": TINY_FEATURE_LAYERS}},
            None,
            r"mask_token_id=320 is not a token of this target \(vocab 320\)",
        ),
        (
            "dflash",
            None,
            {"layer_types": ["full_attention", "sliding_attention"]},
            None,
            r"this DFlash checkpoint uses sliding-window attention, which our drafters do not compute",
        ),
        ("eagle3", None, {"norm_before_residual": True}, None, r"this EAGLE-3 checkpoint uses norm_before_residual"),
        (
            "dflash",
            None,
            {"architectures": ["DFlash2DraftModel"]},
            None,
            r"config.json names architectures \['DFlash2DraftModel'\], not a draft this repository reads",
        ),
    ],
)
def test_a_checkpoint_that_does_not_fit_names_the_problem(tiny_target, tmp_path, kind, change, config, target, message):
    checkpoint = CHECKPOINT[kind](tmp_path, source_drafter(tiny_target, kind), tiny_target, **config)
    if change:
        resave(checkpoint, change)
    with pytest.raises(ValueError, match=f"drafter at {checkpoint}: {message}") as err:
        load_drafter(checkpoint, target() if target else tiny_target)
    assert "\n" not in str(err.value)


def test_feature_layers_beyond_the_target_are_refused(tiny_target, tmp_path):
    source = source_drafter(tiny_target, "dflash")
    checkpoint = zlab_dflash(
        tmp_path, source, tiny_target, dflash_config={"mask_token_id": TINY_MASK, "target_layer_ids": [0, 1, 3]}
    )
    with pytest.raises(ValueError, match=r"built for a deeper target\?\): feature layers \[3\] out of range"):
        make_drafter(DraftSpec(path=str(checkpoint)), tiny_target)


def hub_cache(monkeypatch, tmp_path):
    """No network: the hub answers from its local cache only (HF_HUB_OFFLINE), here a fresh one."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_a_hub_id_loads_from_the_hub_cache(tiny_target, tmp_path, monkeypatch):
    """The layout `huggingface-cli download` leaves: models--OWNER--NAME/{refs/main, snapshots/COMMIT/...}."""
    repo = hub_cache(monkeypatch, tmp_path) / "models--z-lab--tiny-DFlash"
    commit = "0123456789abcdef0123456789abcdef01234567"
    source = source_drafter(tiny_target, "dflash")
    zlab_dflash(repo / "snapshots" / commit, source, tiny_target)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    imported = make_drafter(DraftSpec(path="z-lab/tiny-DFlash"), tiny_target)
    assert torch.equal(proposals(imported, tiny_target), proposals(source, tiny_target))


def test_a_hub_id_offline_fails_in_one_line_with_the_fix(tmp_path, monkeypatch):
    hub_cache(monkeypatch, tmp_path)
    with pytest.raises(SystemExit) as err:
        main(["eval", "configs/tiny.yaml", "draft=z-lab/Qwen3-4B-DFlash-b16", "eval.num_prompts=1"])
    assert str(err.value) == (
        "draft-opd eval: error: draft z-lab/Qwen3-4B-DFlash-b16 is not a local directory and the Hugging Face hub "
        "could not provide it (LocalEntryNotFoundError); download it where the hub is reachable (`huggingface-cli "
        "download z-lab/Qwen3-4B-DFlash-b16 --local-dir DIR`) and pass draft=DIR"
    )


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_eval_with_an_imported_draft_is_lossless_and_matches_the_source(tiny_target, tmp_path, kind):
    """`draft-opd eval configs/tiny.yaml draft=DIR`: a draft trained to tau > 1 (EAGLE-3 with a shuffled reduced
    vocabulary), written in its published format, decodes exactly as the same draft saved by us."""
    source = trained(tiny_target, kind)
    checkpoint = CHECKPOINT[kind](
        tmp_path / "published", source, tiny_target, **({"block_size": 8} if kind == "dflash" else {})
    )
    reports = {}
    for name, draft in (("ours", source.save(tmp_path / "ours")), ("published", checkpoint)):
        reports[name] = tmp_path / f"{name}.json"
        run_eval(
            load_config(
                "configs/tiny.yaml",
                [
                    f"draft={draft}",
                    "draft.block_size=8",
                    "eval.num_prompts=2",
                    "eval.max_new_tokens=16",
                    "eval.warmup_tokens=0",
                    f"eval.out={reports[name]}",
                ],
            )
        )
    ours, published = (json.loads(reports[n].read_text()) for n in ("ours", "published"))
    taus = [turn["taus"] for turn in published["turns"]["gsm8k"]]
    assert taus == [turn["taus"] for turn in ours["turns"]["gsm8k"]] and max(max(t) for t in taus) > 1
    assert all(s["lossless"] for s in published["summaries"])
