"""`draft-opd export`: the self-contained directory, its card, and the serving formats of SGLang and vLLM."""

import json

import pytest
import torch
from safetensors.torch import load_file

from draft_opd.launch.cli import main
from draft_opd.launch.config import load_config, to_yaml
from draft_opd.launch.eval import run_eval
from draft_opd.launch.export import DFLASH_CODE, code_reference, export
from draft_opd.prompts.chat import render_prompt
from draft_opd.prompts.sets import load_benchmark
from draft_opd.speculative.decode import DecodeConfig, generate
from draft_opd.speculative.drafter import DrafterConfig
from draft_opd.speculative.formats import from_dflash, from_eagle3
from draft_opd.speculative.loading import build_drafter, drafter_class
from tests.conftest import TINY_FEATURE_LAYERS, TINY_MASK

TAU_BEFORE, TAU_AFTER = 1.0123, 1.4567
H, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 64, 4, 2, 16, 128, 320  # the tiny testbed (speculative/testbeds.py)
DRAFT_VOCAB = 200


def tiny_draft(target, kind: str, layers: list[int], draft_vocab: list[int] | None = None):
    cfg = DrafterConfig(
        kind=kind,
        block_size=8,
        num_layers=2 if kind == "dflash" else 1,
        target_layer_ids=layers,
        mask_token_id=TINY_MASK if kind == "dflash" else None,
        draft_vocab_size=len(draft_vocab) if draft_vocab else None,
    )
    drafter = build_drafter(cfg, target, seed=5)
    if draft_vocab:
        drafter.d2t.copy_(torch.tensor(draft_vocab))
    return drafter


def trained(target, kind: str, steps: int = 30):
    """A few SFT steps on the target's own greedy text for the 2 eval prompts: tau comes out above 1 (an untrained
    draft gives tau 1 everywhere, which a broken export would match). EAGLE-3 gets a reduced draft vocabulary in
    shuffled order that holds that text, so that its d2t offsets are not all zero."""
    texts = []
    for conv in load_benchmark("gsm8k", None, 2):
        prompt = render_prompt(target.tokenizer, [{"role": "user", "content": conv.turns[0]}], thinking=True)
        tokens = torch.tensor(generate(target, prompt, None, DecodeConfig(max_new_tokens=16)).tokens)
        texts.append((tokens, target.forward(tokens, 0, None).features, len(prompt)))
    used = torch.cat([t for t, _, _ in texts]).unique()
    rest = torch.tensor(sorted(set(range(VOCAB)) - set(used.tolist())))
    vocab = torch.cat([used, rest[: DRAFT_VOCAB - len(used)]])
    vocab = vocab[torch.randperm(DRAFT_VOCAB, generator=torch.Generator().manual_seed(0))].tolist()
    drafter = tiny_draft(target, kind, TINY_FEATURE_LAYERS, vocab if kind == "eagle3" else None).train()
    optimizer, width = torch.optim.Adam(drafter.parameters(), lr=3e-3), 7
    for _ in range(steps):
        loss = 0.0
        for tokens, features, prompt_len in texts:
            anchors = torch.arange(prompt_len - 1, len(tokens) - 1)
            positions = anchors[:, None] + 1 + torch.arange(width)
            labels, mask = tokens[positions.clamp_max(len(tokens) - 1)], (positions < len(tokens)).flatten()
            logits = drafter(features, tokens, anchors, labels[:, :-1])
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
            loss = loss + (ce * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return drafter.eval()


def make_run(root, drafter):
    """A well-formed run directory without running a training job (minutes even on tiny): the config
    `draft-opd train` would resolve, its summary and metrics records, and a saved draft."""
    kind = drafter.cfg.kind
    run = root / f"run-{kind}"
    (run / "draft").mkdir(parents=True)
    overrides = [f"draft.kind={kind}", f"draft.num_layers={drafter.cfg.num_layers}", "name=tiny-export"]
    (run / "config.yaml").write_text(to_yaml(load_config("configs/tiny.yaml", overrides)))
    records = [
        {"step": 0, "phase": "init", "eval_tau": TAU_BEFORE, "draft_version": 0},
        {"step": 1, "phase": "sft", "loss": 3.2, "tau": 1.0, "draft_version": 0},
        {"step": 2, "phase": "opd", "loss": 1.1, "tau": 1.3, "draft_version": 1},
        {"step": 2, "phase": "final", "eval_tau": TAU_AFTER, "draft_version": 1},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"tau_before": TAU_BEFORE, "tau_after": TAU_AFTER, "steps": 2, "draft": str(run / "draft"), "wall_s": 9.0}
    (run / "summary.json").write_text(json.dumps(summary))
    drafter.save(run / "draft")
    return run


@pytest.fixture(scope="module", params=["dflash", "eagle3"])
def exported(request, tiny_target, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    run = make_run(root, trained(tiny_target, request.param))
    return request.param, run, export(run, root / "out")


def test_export_writes_the_draft_its_config_and_a_card(exported):
    kind, run, result = exported
    out = result.out_dir
    for name in ("config.json", "model.safetensors"):
        assert (out / name).read_bytes() == (run / "draft" / name).read_bytes()
    assert (out / "training_config.yaml").read_text() == (run / "config.yaml").read_text()
    assert result.formats == [kind] and (out / kind / "config.json").exists()
    card = (out / "README.md").read_text()
    assert "1.012" in card and "1.457" in card  # tau before / after from summary.json
    assert f"a {kind} draft" in card and "block size | 8" in card
    assert f"draft-opd eval {out}/training_config.yaml draft={out}" in card
    assert f"--speculative-draft-model-path {out / kind}" in card and f'"method": "{kind}"' in card


def test_exported_draft_gives_the_runs_tau_on_the_same_prompts(exported, tmp_path):
    _, run, result = exported
    reports = {}
    for name, draft in (("run", run / "draft"), ("export", result.out_dir)):
        reports[name] = tmp_path / f"{name}.json"
        run_eval(
            load_config(
                result.out_dir / "training_config.yaml",
                [
                    f"draft={draft}",
                    "eval.num_prompts=2",
                    "eval.max_new_tokens=16",
                    "eval.warmup_tokens=0",
                    f"eval.out={reports[name]}",
                ],
            )
        )
    ours, theirs = (json.loads(reports[n].read_text()) for n in ("run", "export"))
    taus = [t["taus"] for t in ours["turns"]["gsm8k"]]
    assert taus == [t["taus"] for t in theirs["turns"]["gsm8k"]] and max(max(t) for t in taus) > 1
    for a, b in zip(ours["summaries"], theirs["summaries"]):
        assert (a["tau_mean"], a["tau_pooled"], a["lossless"]) == (b["tau_mean"], b["tau_pooled"], b["lossless"])


def expected_tensors(kind: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names and shapes the serving loaders read, taken from their sources, not from speculative/formats.py."""
    f32 = torch.float32
    attn_in = 2 * H if kind == "eagle3" else H  # EAGLE-3 attends over concat(embedding, hidden)
    layer = {
        "input_layernorm.weight": (H,),
        "post_attention_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (HEADS * HEAD_DIM, attn_in),
        "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, attn_in),
        "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, attn_in),
        "self_attn.o_proj.weight": (H, HEADS * HEAD_DIM),
        "mlp.gate_proj.weight": (INTER, H),
        "mlp.up_proj.weight": (INTER, H),
        "mlp.down_proj.weight": (H, INTER),
    }
    if kind == "dflash":
        # z-lab/dflash dflash/model.py (DFlashDraftModel, Qwen3DFlashDecoderLayer, Qwen3DFlashAttention);
        # sgl-project/sglang python/sglang/srt/models/dflash.py load_weights reads the same names.
        layer |= {"self_attn.q_norm.weight": (HEAD_DIM,), "self_attn.k_norm.weight": (HEAD_DIM,)}
        names = {"fc.weight": (H, 3 * H), "hidden_norm.weight": (H,), "norm.weight": (H,)}
        names |= {f"layers.{i}.{k}": v for i in range(2) for k, v in layer.items()}
        return {k: (v, f32) for k, v in names.items()}
    # sgl-project/SpecForge specforge/modeling/draft/llama3_eagle.py (LlamaForCausalLMEagle3: midlayer, fc, norm,
    # lm_head, t2d/d2t buffers) and specforge/export/to_sglang.py (_REQUIRED_SERVING_KEYS); SGLang's
    # llama_eagle3.py and vLLM's llama_eagle3.py load these (vLLM renames midlayer. to layers.0.).
    layer |= {"hidden_norm.weight": (H,)}
    names = {"fc.weight": (H, 3 * H), "norm.weight": (H,), "lm_head.weight": (DRAFT_VOCAB, H)}
    names |= {f"midlayer.{k}": v for k, v in layer.items()}
    out = {k: (v, f32) for k, v in names.items()}
    return out | {"d2t": ((DRAFT_VOCAB,), torch.int64), "t2d": ((VOCAB,), torch.bool)}


def test_serving_checkpoint_has_the_names_and_shapes_its_loaders_expect(exported):
    kind, _, result = exported
    tensors = load_file(str(result.out_dir / kind / "model.safetensors"))
    assert {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()} == expected_tensors(kind)
    config = json.loads((result.out_dir / kind / "config.json").read_text())
    assert (
        config["hidden_size"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["head_dim"],
        config["vocab_size"],
        config["tie_word_embeddings"],
    ) == (H, HEADS, KV_HEADS, HEAD_DIM, VOCAB, False)
    if kind == "dflash":
        assert config["architectures"] == ["DFlashDraftModel"] and config["block_size"] == 8
        assert config["dflash_config"] == {"mask_token_id": TINY_MASK, "target_layer_ids": TINY_FEATURE_LAYERS}
        assert config["num_target_layers"] == 4 and config["layer_types"] == ["full_attention"] * 2
    else:
        assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["num_hidden_layers"] == 1
        assert config["draft_vocab_size"] == DRAFT_VOCAB
        assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == TINY_FEATURE_LAYERS  # SGLang: outputs
        assert config["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in TINY_FEATURE_LAYERS]  # vLLM: inputs
        ours = load_file(str(result.out_dir / "model.safetensors"))["d2t"]
        assert torch.equal(torch.arange(DRAFT_VOCAB) + tensors["d2t"], ours)  # target id = draft id + d2t
        assert tensors["t2d"].sum() == DRAFT_VOCAB and tensors["t2d"][ours].all()


def test_serving_format_maps_back_to_identical_logits(exported, tiny_target):
    kind, run, result = exported
    config = json.loads((result.out_dir / kind / "config.json").read_text())
    tensors = load_file(str(result.out_dir / kind / "model.safetensors"))
    cfg, state = from_dflash(config, tensors) if kind == "dflash" else from_eagle3(config, tensors, block_size=8)
    native = json.loads((run / "draft" / "config.json").read_text())
    assert vars(cfg) == {k: v for k, v in native.items() if k != "architecture"}
    back = drafter_class(kind)(cfg, tiny_target.embed_tokens.weight, tiny_target.lm_head)
    back.load_state_dict(state)
    original = drafter_class(kind)(cfg, tiny_target.embed_tokens.weight, tiny_target.lm_head)
    original.load_state_dict(load_file(str(run / "draft" / "model.safetensors")))
    prompt = torch.tensor(list(range(40, 60)))
    features = tiny_target.forward(prompt, 0, None).features

    def pick(x):
        return x.argmax(-1)

    logits = [d.propose(d.begin(features, prompt), torch.tensor(7), len(prompt), 7, pick)[1] for d in (original, back)]
    assert torch.equal(*logits)


def test_dflash_config_names_zlabs_published_code_in_transformers_cross_repo_form(exported, tmp_path):
    """`dflash/config.json` has `auto_map = {"AutoModel": "z-lab/Qwen3-8B-DFlash-b16--dflash.DFlashDraftModel"}`,
    and transformers itself reads it so: `AutoModel.from_pretrained(dflash/, trust_remote_code=True)` goes to fetch
    `dflash.py` from that hub repository for class `DFlashDraftModel`. The hub cannot be reached here, so the load
    runs with `local_files_only=True` and an empty cache, and stops (OSError) exactly there; the test reads the
    repository, module file and class from the arguments of transformers' own `get_class_from_dynamic_module` and
    `get_cached_module_file` in that traceback. Nothing is mocked. Without `trust_remote_code` the same directory
    quietly loads as a plain Qwen3Model (the failure the card warns of). EAGLE-3 gets no auto_map."""
    from transformers import AutoModel

    kind, _, result = exported
    config = json.loads((result.out_dir / kind / "config.json").read_text())
    if kind != "dflash":
        assert "auto_map" not in config
        return
    assert (
        config["auto_map"]
        == {"AutoModel": "z-lab/Qwen3-8B-DFlash-b16--dflash.DFlashDraftModel"}
        == {"AutoModel": DFLASH_CODE}
    )
    assert code_reference(DFLASH_CODE) == ("z-lab/Qwen3-8B-DFlash-b16", "dflash", "DFlashDraftModel")
    with pytest.raises(OSError) as failure:
        AutoModel.from_pretrained(
            result.out_dir / kind, trust_remote_code=True, local_files_only=True, cache_dir=tmp_path / "hub"
        )
    calls = {entry.frame.code.name: entry.locals for entry in failure.traceback}
    resolved = calls["get_class_from_dynamic_module"]
    assert (resolved["repo_id"], resolved["module_file"], resolved["class_name"]) == (
        "z-lab/Qwen3-8B-DFlash-b16",
        "dflash",
        "DFlashDraftModel",
    )
    fetched = calls["get_cached_module_file"]
    assert (str(fetched["pretrained_model_name_or_path"]), fetched["module_file"]) == (
        "z-lab/Qwen3-8B-DFlash-b16",
        "dflash.py",
    )
    assert type(AutoModel.from_pretrained(result.out_dir / kind)).__name__ == "Qwen3Model"


def test_card_says_how_to_load_with_transformers(exported):
    kind, _, result = exported
    card = (result.out_dir / "README.md").read_text()
    if kind != "dflash":
        assert "## Loading with transformers" not in card
        return
    section = card.split("## Loading with transformers", 1)[1].split("\n## ", 1)[0]
    path = result.out_dir / "dflash"
    assert f'"AutoModel": "{DFLASH_CODE}"' in section
    assert "https://huggingface.co/z-lab/Qwen3-8B-DFlash-b16" in section and "`dflash.py`" in section
    assert f'AutoModel.from_pretrained("{path}", trust_remote_code=True' in section
    assert "plain `Qwen3Model`" in section  # what happens without trust_remote_code
    assert 'hf download z-lab/Qwen3-8B-DFlash-b16 --include "*.py"' in section and "HF_HUB_OFFLINE=1" in section
    assert "git clone https://github.com/z-lab/dflash.git" in section
    assert "from dflash.model import DFlashDraftModel, dflash_generate" in section
    assert f'DFlashDraftModel.from_pretrained("{path}"' in section


def test_dflash_code_is_configurable_and_checked(tiny_target, tmp_path):
    run = make_run(tmp_path, tiny_draft(tiny_target, "dflash", TINY_FEATURE_LAYERS))
    other = "z-lab/Qwen3-4B-DFlash-b16--dflash.DFlashDraftModel"
    main(["export", str(run), str(tmp_path / "out"), "--dflash-code", other])
    assert json.loads((tmp_path / "out" / "dflash" / "config.json").read_text())["auto_map"] == {"AutoModel": other}
    card = (tmp_path / "out" / "README.md").read_text()
    assert "https://huggingface.co/z-lab/Qwen3-4B-DFlash-b16" in card and "Qwen3-8B" not in card
    for bad in ("dflash.DFlashDraftModel", "z-lab--dflash.DFlashDraftModel", "z-lab/x--dflash", "z-lab/x--a.b.C"):
        with pytest.raises(SystemExit, match="is not <hub repo>--<module>.<Class>|is not a Python name"):
            main(["export", str(run), str(tmp_path / "bad"), "--dflash-code", bad])
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "kind, layers, reason",
    [("dflash", [2, 0, 1], "not strictly ascending"), ("eagle3", [0, 2], "fuses 2 target layers")],
)
def test_inexact_mapping_is_documented_not_written(tiny_target, tmp_path, kind, layers, reason):
    run = make_run(tmp_path, tiny_draft(tiny_target, kind, layers))
    result = export(run, tmp_path / "out")
    assert result.formats == [] and not (tmp_path / "out" / kind).exists()
    assert reason in result.not_written[kind]
    assert reason in (tmp_path / "out" / "README.md").read_text()
    with pytest.raises(SystemExit, match=f"the {kind} format would not compute what this draft computes"):
        main(["export", str(run), str(tmp_path / "other"), "--formats", kind])


def test_bad_run_or_out_dir_exits_with_the_fix(exported, tmp_path, capsys):
    kind, run, _ = exported
    with pytest.raises(SystemExit, match="no run directory at .*; pass runs/<name>"):
        main(["export", str(tmp_path / "nope"), str(tmp_path / "out")])
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("name: half\n")
    with pytest.raises(SystemExit, match=r"not a finished run directory: no summary.json, .*draft/config.json"):
        main(["export", str(tmp_path / "half"), str(tmp_path / "out")])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="is not empty; pass --force"):
        main(["export", str(run), str(tmp_path / "busy")])
    main(["export", str(run), str(tmp_path / "busy"), "--force", "--formats", "none"])
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"  # --force replaces only what export writes
    assert (tmp_path / "busy" / "model.safetensors").exists() and not (tmp_path / "busy" / kind).exists()
    other = "eagle3" if kind == "dflash" else "dflash"
    with pytest.raises(SystemExit, match=f"a {kind} draft exports to the {kind} format only"):
        main(["export", str(run), str(tmp_path / "fresh"), "--formats", other])
    assert "exported" in capsys.readouterr().out
