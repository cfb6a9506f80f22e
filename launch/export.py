"""`draft-opd export RUN_DIR OUT_DIR`: a trained draft as a self-contained directory.

OUT_DIR/config.json + model.safetensors are the run's draft, byte for byte (`draft-opd eval CONFIG
draft=OUT_DIR` loads them); OUT_DIR/training_config.yaml is the run's config (a CONFIG for that eval);
OUT_DIR/<format>/ is the checkpoint SGLang and vLLM load, written only where the mapping is exact
(speculative/formats.py), a DFlash one naming z-lab's published modeling code in its auto_map (DFLASH_CODE);
OUT_DIR/README.md is the card: architecture, training, measured tau, how to evaluate, serve and load it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from draft_opd.launch.run_dir import RunDir
from draft_opd.speculative.drafter import DrafterConfig, read_native_config
from draft_opd.speculative.formats import FORMATS, serving_blockers, to_format

DFLASH_CODE = "z-lab/Qwen3-8B-DFlash-b16--dflash.DFlashDraftModel"
"""The `auto_map["AutoModel"]` of `dflash/config.json`: z-lab's own `DFlashDraftModel`, in the modeling file
`dflash.py` of their published draft for Qwen3-8B (the repository z-lab's README loads with `AutoModel`), in
transformers' cross-repository form `<repo>--<module>.<Class>`. So `AutoModel.from_pretrained(OUT_DIR/dflash,
trust_remote_code=True)` builds z-lab's class rather than a plain Qwen3Model (the config is a Qwen3 one), and
nothing of theirs is copied here. z-lab's Qwen3 DFlash configs name their code `dflash.DFlashDraftModel` (copies
of z-lab/Qwen3-4B-DFlash-b16's config, SpecForge's configs/qwen3-4b-dflash.json), and z-lab's `DFlashDraftModel`
takes every shape from the config (Qwen3 layers, `dflash_config`, `block_size`), so it builds any draft in this
format. No `AutoConfig` entry: the config is a stock Qwen3Config, `DFlashDraftModel.config_class`. Pass another
reference to `export(dflash_code=...)` (or `--dflash-code`) to name another published copy of that code."""
RUN_FILES = ("config.yaml", "summary.json", "metrics.jsonl", "draft/config.json", "draft/model.safetensors")
OWNED = ("config.json", "model.safetensors", "training_config.yaml", "README.md", *FORMATS)  # what --force replaces
CHOICES = ("auto", "none", *FORMATS)


@dataclass
class Exported:
    out_dir: Path
    formats: list[str] = field(default_factory=list)  # serving formats written
    not_written: dict[str, str] = field(default_factory=dict)  # format -> why not


@dataclass
class Run:
    """What a finished run directory holds, read once."""

    dir: Path
    draft: DrafterConfig
    config: dict  # config.yaml as plain data (the schema may have moved on since)
    summary: dict
    metrics: list[dict]

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.dir.name)


def read_run(run_dir: Path) -> Run:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory at {run_dir}; pass runs/<name>, written by `draft-opd train`")
    missing = [name for name in RUN_FILES if not (run_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"not a finished run directory: no {', '.join(missing)} in {run_dir}; pass runs/<name> "
            "of a run that finished (`draft-opd train` writes draft/ and summary.json at the end)"
        )
    run = RunDir(run_dir)
    return Run(
        dir=run_dir,
        draft=read_native_config(json.loads((run.draft_dir / "config.json").read_text())),
        config=OmegaConf.to_container(OmegaConf.load(run.config_file)),
        summary=run.summary(),
        metrics=run.records(),
    )


def prepare_out_dir(out_dir: Path, run_dir: Path, force: bool) -> None:
    """Refuse to write over anything but an earlier export (and only with --force)."""
    if out_dir.resolve() in (run_dir.resolve(), (run_dir / "draft").resolve()):
        raise ValueError(f"{out_dir} is the run directory or its draft/; export to a new directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file; pass a directory to export into")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise FileExistsError(
                f"{out_dir} is not empty; pass --force to overwrite an earlier export there, or choose a new directory"
            )
        for name in OWNED:
            path = out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def choose_formats(draft: DrafterConfig, formats: str) -> tuple[list[str], dict[str, str]]:
    """The serving formats to write, and why the draft's own format is not written (if it is not)."""
    if formats not in CHOICES:
        raise ValueError(f"unknown format {formats!r}; use one of {', '.join(CHOICES)}")
    if formats == "none":
        return [], {draft.kind: "not requested (--formats none)"}
    if formats != "auto" and formats != draft.kind:
        raise ValueError(f"a {draft.kind} draft exports to the {draft.kind} format only, not {formats}")
    blockers = serving_blockers(draft)
    if blockers and formats != "auto":
        raise ValueError(f"the {formats} format would not compute what this draft computes: {'; '.join(blockers)}")
    return ([], {draft.kind: "; ".join(blockers)}) if blockers else ([draft.kind], {})


def target_shape(target: dict) -> tuple[int, int]:
    """(decoder layers, context length) of the run's target, from its config alone (no weights)."""
    from transformers import AutoConfig

    from draft_opd.speculative.testbeds import smol_dir, tiny_config

    if target.get("testbed") == "tiny":
        config = tiny_config()
    else:
        source = str(smol_dir()) if target.get("testbed") == "smol" else str(target.get("path"))
        gguf = None if target.get("testbed") == "smol" else target.get("gguf_file")
        if gguf is None and source.endswith(".gguf"):
            source, gguf = str(Path(source).parent), Path(source).name
        try:
            config = AutoConfig.from_pretrained(source, **({"gguf_file": gguf} if gguf else {}))
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"cannot read the target's config at {source} ({err.__class__.__name__}); the "
                "serving formats record its depth and context length. Make the target available "
                "(`make smol`, or target.path in the run's config.yaml), or pass --formats none"
            ) from None
    return int(config.num_hidden_layers), int(getattr(config, "max_position_embeddings", 32768))


def code_reference(reference: str) -> tuple[str, str, str]:
    """(repository, module, class) of a cross-repository auto_map entry `<repo>--<module>.<Class>`, read as
    transformers reads it (`dynamic_module_utils.get_class_from_dynamic_module`: split at `--`, then at `.`)."""
    repo, sep, rest = reference.partition("--")
    module, dot, name = rest.partition(".")
    if not (sep and repo.count("/") == 1 and all(repo.split("/")) and dot and module.isidentifier()):
        raise ValueError(
            f"--dflash-code {reference!r} is not <hub repo>--<module>.<Class>, e.g. {DFLASH_CODE} "
            "(a published repository holding <module>.py, as transformers' auto_map names remote code)"
        )
    if not name.isidentifier():
        raise ValueError(f"--dflash-code {reference!r}: the class {name!r} is not a Python name")
    return repo, module, name


def serving_checkpoint(run: Run, fmt: str, dflash_code: str = DFLASH_CODE) -> tuple[dict, dict]:
    """The (config, tensors) of `fmt`, built in memory so that a failure leaves OUT_DIR untouched. A DFlash config
    also names the published code that `AutoModel.from_pretrained(..., trust_remote_code=True)` runs (DFLASH_CODE)."""
    state = load_file(str(run.dir / "draft" / "model.safetensors"))
    layers, positions = target_shape(run.config.get("target") or {})
    config, tensors = to_format(fmt, run.draft, state, layers, positions)
    if fmt == "dflash":
        architectures = config.pop("architectures")
        config = {"architectures": architectures, "auto_map": {"AutoModel": dflash_code}, **config}
    return config, tensors


def export(
    run_dir: str | Path,
    out_dir: str | Path,
    formats: str = "auto",
    force: bool = False,
    dflash_code: str = DFLASH_CODE,
) -> Exported:
    """Write the run's draft, its serving format (where exact) and its card into `out_dir`. `dflash_code` is the
    published modeling code a DFlash export's `auto_map` names (DFLASH_CODE)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    code_reference(dflash_code)
    run = read_run(run_dir)
    chosen, not_written = choose_formats(run.draft, formats)
    checkpoints = {fmt: serving_checkpoint(run, fmt, dflash_code) for fmt in chosen}
    prepare_out_dir(out_dir, run_dir, force)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(run_dir / "draft" / name, out_dir / name)
    shutil.copyfile(run_dir / "config.yaml", out_dir / "training_config.yaml")
    for fmt, (config, tensors) in checkpoints.items():
        (out_dir / fmt).mkdir()
        (out_dir / fmt / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(out_dir / fmt / "model.safetensors"), metadata={"format": "pt"})
    result = Exported(out_dir=out_dir, formats=chosen, not_written=not_written)
    (out_dir / "README.md").write_text(model_card(run, result))
    return result


# ----------------------------------------------------------------------------- the card


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _section(config: dict, name: str) -> dict:
    return config.get(name) or {}


def target_label(target: dict) -> str:
    return f"testbed `{target['testbed']}`" if target.get("testbed") else f"`{target.get('path')}`"


def architecture_table(draft: DrafterConfig, params: int) -> str:
    rows = [
        ("kind", draft.kind),
        ("block size", f"{draft.block_size} (the anchor + {draft.block_size - 1} proposals)"),
        ("draft layers", draft.num_layers),
        ("target feature layers", draft.target_layer_ids),
        ("hidden / intermediate", f"{draft.hidden_size} / {draft.intermediate_size}"),
        ("heads / kv heads / head dim", f"{draft.num_heads} / {draft.num_kv_heads} / {draft.head_dim}"),
        (
            "vocabulary",
            draft.vocab_size
            if draft.draft_vocab_size is None
            else f"{draft.draft_vocab_size} draft tokens of {draft.vocab_size}",
        ),
        ("rope theta / rms eps", f"{draft.rope_theta:g} / {draft.rms_norm_eps:g}"),
        (
            "trained parameters",
            (
                f"{params:,} (embedding{'' if draft.kind == 'eagle3' else ' and LM head'} "
                "shared with the target, not stored)"
            ),
        ),
    ]
    if draft.mask_token_id is not None:
        rows.insert(4, ("mask token id", draft.mask_token_id))
    return "| field | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def training_section(run: Run) -> str:
    train, objective, learner, rollout = (_section(run.config, n) for n in ("train", "objective", "learner", "rollout"))
    done: dict[str, int] = {}
    for record in run.metrics:
        if record.get("phase") in ("sft", "opd") and "loss" in record:
            done[record["phase"]] = done.get(record["phase"], 0) + 1
    wall = run.summary.get("wall_s")
    sft = (
        f"random anchors in the target's own text, position weights exp(-(k-1)/{objective.get('sft_gamma')})"
        if run.draft.kind == "dflash"
        else f"training-time test from random anchors, step weights {objective.get('eagle_decay')}^i"
    )
    lines = [
        f"- Phases: SFT warm-up for {train.get('sft_steps')} learner steps ({sft}), then Draft-OPD for "
        f"{train.get('opd_steps')} steps (error-position replay of the draft's own rollouts, variant "
        f"`{objective.get('opd_variant')}`, response KL `{objective.get('response_kl', 'bernoulli')}`, "
        f"rejected-stream decay "
        f"{objective.get('opd_decay')}). Steps logged: "
        + (", ".join(f"{k} {v}" for k, v in done.items()) or "none")
        + f"; total {run.summary.get('steps')}"
        + (f", {wall / 60:.1f} min wall" if wall else "")
        + ".",
        (
            f"- Learner: lr {learner.get('lr')}, batch {learner.get('batch_size')}, "
            f"warm-up {learner.get('warmup_steps')} "
            f"steps, grad clip {learner.get('grad_clip')}, DeepSpeed ZeRO-{learner.get('zero_stage')} "
            f"x{learner.get('world_size')} in {learner.get('dtype')}."
        ),
        (
            f"- Rollouts: {rollout.get('num_actors')} actors on `{rollout.get('prompts')}` prompts, up to "
            f"{rollout.get('max_new_tokens')} new tokens, T = {rollout.get('temperature')}, target in "
            f"{rollout.get('target_dtype') or _section(run.config, 'target').get('dtype')}."
        ),
        "- The full configuration is `training_config.yaml`.",
    ]
    return "\n".join(lines)


def tau_section(run: Run) -> str:
    train = _section(run.config, "train")
    evals = [r for r in run.metrics if "eval_tau" in r]
    rows = "".join(
        f"| {r.get('step')} | {r.get('phase')} | {_fmt(r['eval_tau'])} | {r.get('draft_version')} |\n" for r in evals
    )
    return (
        f"Held-out tau before training **{_fmt(run.summary.get('tau_before'))}**, after "
        f"**{_fmt(run.summary.get('tau_after'))}** (`summary.json`): {train.get('eval_benchmark')}, "
        f"{train.get('eval_prompts')} prompts, {train.get('eval_max_new_tokens')} new tokens, T = 0, measured by "
        "the run's evaluating rollout actor. tau = accepted draft tokens + 1 per verify step, averaged per prompt "
        "and then over prompts (the DFlash convention).\n\n"
        "| step | phase | eval tau | draft version |\n|---|---|---|---|\n" + rows
    )


def serving_section(run: Run, result: Exported) -> str:
    draft, b = run.draft, run.draft.block_size
    if not result.formats:
        reason = result.not_written.get(draft.kind, "")
        return (
            f"The {draft.kind} serving format was **not written**: {reason}. What the format would hold is in the "
            "mapping below; `speculative/formats.py` checks exactness.\n\n" + MAPPING
        )
    path = result.out_dir / draft.kind
    if draft.kind == "dflash":
        sglang = (
            f"python -m sglang.launch_server --model-path TARGET --speculative-algorithm DFLASH \\\n"
            f"    --speculative-draft-model-path {path} --speculative-num-draft-tokens {b}"
        )
        vllm = (
            f"vllm serve TARGET --speculative-config "
            f'\'{{"method": "dflash", "model": "{path}", "num_speculative_tokens": {b - 1}}}\''
        )
        what = (
            "`dflash/` is z-lab's `DFlashDraftModel` checkpoint (Qwen3 layers, `dflash_config`); SGLang and vLLM "
            "take the embedding and LM head from the target. vLLM needs an attention backend that supports "
            "non-causal drafting (z-lab's README passes `--attention-backend flash_attn`)."
        )
    else:
        sglang = (
            f"python -m sglang.launch_server --model-path TARGET --speculative-algorithm EAGLE3 \\\n"
            f"    --speculative-draft-model-path {path} --speculative-num-steps {b - 1} "
            f"--speculative-eagle-topk 1 --speculative-num-draft-tokens {b}"
        )
        vllm = (
            f"vllm serve TARGET --speculative-config "
            f'\'{{"method": "eagle3", "model": "{path}", "num_speculative_tokens": {b - 1}}}\''
        )
        what = (
            "`eagle3/` is a `LlamaForCausalLMEagle3` checkpoint (SpecForge's layout); SGLang and vLLM take the "
            "embedding from the target. `--speculative-eagle-topk 1` drafts a chain, as this draft was trained."
        )
    return (
        f"{what} TARGET is the run's target, {target_label(_section(run.config, 'target'))}.\n\n"
        f"SGLang:\n\n```bash\n{sglang}\n```\n\nvLLM:\n\n```bash\n{vllm}\n```\n\n" + MAPPING
    )


MAPPING = """| ours (`config.json`, `model.safetensors`) | DFlash (`dflash/`) | EAGLE-3 (`eagle3/`) |
|---|---|---|
| `kind`, `block_size` | `architectures: [DFlashDraftModel]`, `block_size` | `architectures: [LlamaForCausalLMEagle3]`; block size is a server flag |
| `target_layer_ids` (outputs of those target layers) | `dflash_config.target_layer_ids` | `eagle_config.eagle_aux_hidden_state_layer_ids` (SGLang, outputs) and `eagle_aux_hidden_state_layer_ids` = ids + 1 (vLLM, inputs) |
| `mask_token_id` | `dflash_config.mask_token_id` | - |
| `fc`, `hidden_norm`, `layers.i.*`, `norm` | same names | `fc`, `norm`; `layer.{q,k,v,o}_proj` -> `midlayer.self_attn.*`, other `layer.*` -> `midlayer.*` |
| `lm_head`, `d2t` (draft id -> target id) | - (the target's LM head) | `lm_head`; `d2t` as offsets (target = draft + d2t), `t2d` mask over the target vocabulary |
| embedding: the target's | the target's | the target's |

Exact only with strictly ascending feature layers (servers capture in depth order) and, for EAGLE-3, exactly
three of them (both servers build `fc` over 3 x hidden). RoPE is plain (no scaling), as in our drafters."""  # noqa: E501 (a markdown table)


def transformers_section(result: Exported) -> str:
    """How to load `dflash/` with transformers: z-lab's published code through auto_map, or z-lab's GitHub code."""
    path = result.out_dir / "dflash"
    reference = json.loads((path / "config.json").read_text())["auto_map"]["AutoModel"]
    repo, module, name = code_reference(reference)
    return f"""## Loading with transformers

`dflash/config.json` names z-lab's published modeling code in its `auto_map`:
`"AutoModel": "{reference}"`. With it, `AutoModel` fetches `{module}.py` (and the files that imports)
from the Hugging Face repository [{repo}](https://huggingface.co/{repo}) and builds that file's
`{name}` from this directory's config and weights. No modeling code is copied into this export. What runs
is z-lab's code, so loading needs

- `trust_remote_code=True`: without it transformers quietly builds a plain `Qwen3Model` from this
  Qwen3 config (`fc` and `hidden_norm` unexpected, `embed_tokens` missing);
- access to the Hugging Face hub, or a copy of `{repo}`'s `.py` files already in the local
  Hugging Face cache (below).

```python
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

draft = AutoModel.from_pretrained("{path}", trust_remote_code=True, dtype="auto").eval()
target = AutoModelForCausalLM.from_pretrained("TARGET", dtype="auto").eval()
tokenizer = AutoTokenizer.from_pretrained("TARGET")
# then, as z-lab's README does: draft.spec_generate(input_ids=input_ids, max_new_tokens=2048,
#     temperature=0.0, target=target, stop_token_ids=[tokenizer.eos_token_id])
```

Without hub access where the model runs: download the code once on a machine that has it (into the Hugging
Face cache, which you then carry over), and load with the hub switched off. `code_revision="<commit>"` in
`from_pretrained` pins the code to one commit of `{repo}`.

```bash
hf download {repo} --include "*.py"
HF_HUB_OFFLINE=1 python your_script.py
```

The other route needs neither `trust_remote_code` nor the hub: z-lab's GitHub code, `dflash/model.py` of
https://github.com/z-lab/dflash. That is the code this format was checked against (on CPU: it loads
`dflash/` strictly, and its `dflash_generate` accepts exactly as this repository's decoding loop does).

```bash
git clone https://github.com/z-lab/dflash.git && cd dflash && pip install -e ".[transformers]"
```

```python
from dflash.model import DFlashDraftModel, dflash_generate

draft = DFlashDraftModel.from_pretrained("{path}", dtype="auto").eval()
output_ids = dflash_generate(draft, target=target, input_ids=input_ids, max_new_tokens=2048,
                             stop_token_ids=[tokenizer.eos_token_id], temperature=0.0)
```

"""


def model_card(run: Run, result: Exported) -> str:
    draft, out = run.draft, result.out_dir
    target = _section(run.config, "target")
    train = _section(run.config, "train")
    params = sum(
        t.numel() for name, t in load_file(str(run.dir / "draft" / "model.safetensors")).items() if name != "d2t"
    )
    evaluate = (
        f"draft-opd eval {out}/training_config.yaml draft={out} eval.benchmarks=[{train.get('eval_benchmark')}] "
        f"eval.num_prompts={train.get('eval_prompts')} eval.max_new_tokens={train.get('eval_max_new_tokens')}"
    )
    return f"""# {run.name}: a {draft.kind} draft for {target_label(target)}

A speculative-decoding draft model trained with Draft-OPD (on-policy, with an SFT warm-up) by this
repository, exported from `{run.dir}`. It proposes {draft.block_size - 1} tokens per verify step from
the target's hidden states; output stays the target's own.

## Architecture

{architecture_table(draft, params)}
## Training

{training_section(run)}

## Measured tau

{tau_section(run)}
## Evaluate

```bash
{evaluate}
```

`draft={out}` loads `config.json` + `model.safetensors` (the run's `draft/`, unchanged), so tau matches the
run's draft on the same prompts.

## Serve

{serving_section(run, result)}

{transformers_section(result) if "dflash" in result.formats else ""}## Files

- `config.json`, `model.safetensors`: the draft in this repository's format.
- `training_config.yaml`: the run's configuration.
""" + "".join(
        f"- `{fmt}/`: the {fmt} serving checkpoint (`config.json`, `model.safetensors`).\n" for fmt in result.formats
    )


EXPORT_HELP = "a trained draft as a self-contained directory, with its serving format"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of an export, for `draft-opd export` and `python -m draft_opd.launch.export` alike."""
    parser.add_argument("run_dir", help="a finished run directory, runs/<name>")
    parser.add_argument("out_dir", help="where to write: a new or empty directory, or an earlier export with --force")
    parser.add_argument("--force", action="store_true", help="overwrite an earlier export in OUT_DIR")
    parser.add_argument(
        "--formats",
        default="auto",
        choices=("auto", "none", "dflash", "eagle3"),
        help="serving format to write: auto (the draft's own, where the mapping is exact), none, "
        "or dflash/eagle3 (an error where it is not exact)",
    )
    parser.add_argument(
        "--dflash-code",
        default=DFLASH_CODE,
        metavar="REPO--MODULE.CLASS",
        help="the published modeling code dflash/config.json's auto_map names, for "
        f"AutoModel.from_pretrained(..., trust_remote_code=True) (default {DFLASH_CODE})",
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m draft_opd.launch.export RUN_DIR OUT_DIR [--force] [--formats F] [--dflash-code C]`, the same as
    `draft-opd export`."""
    parser = argparse.ArgumentParser(prog="python -m draft_opd.launch.export", description=EXPORT_HELP)
    add_arguments(parser)
    cli(parser.parse_args(argv))


def cli(args: argparse.Namespace) -> Exported:
    """Run an export from parsed arguments; bad input ends the process with one line naming the fix."""
    try:
        result = export(args.run_dir, args.out_dir, args.formats, args.force, args.dflash_code)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        sys.exit(f"draft-opd export: error: {err}")
    written = ", ".join(f"{fmt}/" for fmt in result.formats) or "no serving format"
    print(f"exported {args.run_dir} to {result.out_dir}: config.json, model.safetensors, README.md, {written}")
    for fmt, why in result.not_written.items():
        print(f"  {fmt} format not written: {why}")
    return result


if __name__ == "__main__":
    main()
