"""The offline-SFT learning curve: held-out tau against trained label tokens and wall time (`make curve`).

Why: published DFlash and EAGLE-3 drafts are trained offline on the target's own responses, and Draft-OPD
starts from such a draft. This measures how far that recipe gets on this machine. Three stages, each
resumable and skipped once done, so an interrupted `make curve` picks up where it stopped:

1. `draft-opd generate`: the target's greedy answers to GSM8K training prompts, with stored features;
2. `draft-opd train`: offline SFT on that corpus (fp32 learner, many anchors per row), checkpointed every
   200 steps and every checkpoint kept;
3. held-out tau of the initial draft, of every checkpoint and of the final draft on the first 50 GSM8K test
   prompts x 128 new tokens, fp32 target, walked on the target's greedy text (`studies.text_eval`: the
   accept lengths decoding records, without decoding); then OUT/curve.json and OUT/curve.png.
   Why after training and not during: a decoded evaluation beside the learner shares its 2 cores and
   slowed it up to 4x for the quarter hour it took (see the README); scored afterwards, one checkpoint
   costs about a minute.

    python -m draft_opd.studies.sft_curve configs/smol.yaml [key=value ...]   (overrides apply to both runs)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from draft_opd.launch.config import Config, load_config
from draft_opd.launch.generate import frequent_tokens
from draft_opd.launch.run_dir import RunDir, step_records, training_seconds
from draft_opd.launch.train import train
from draft_opd.speculative.loading import make_drafter
from draft_opd.speculative.target import load_target
from draft_opd.studies.text_eval import TextScorer, checkpoint_states

OUT = "runs/curve"  # DFlash's curve; another drafter kind's goes to runs/curve-KIND, on the same corpus
CORPUS = f"{OUT}/corpus"
GENERATE = [
    "generate.num_prompts=2016",
    "generate.batch_size=64",
    "generate.max_new_tokens=128",
    "generate.store_features=true",
]  # fp32 (the config's dtype), batch 64: 122 tokens/s here, bf16 at batch 32 43 (docs/results/sft-curve.md)
TRAIN = [
    "name=sft",
    f"train.sft_corpus={CORPUS}",
    "train.sft_steps=1500",
    "train.opd_steps=0",
    "learner.dtype=float32",  # bf16 GEMMs run 4x slower on CPUs without AVX512-BF16 (sft-curve.md)
    "learner.batch_size=256",
    "objective.sft_anchors_per_row=32",
    "learner.lr=1e-3",
    "learner.lr_schedule=cosine",
    "learner.warmup_steps=50",
    "train.eval_every=0",
    "train.eval_prompts=2",
    "train.eval_max_new_tokens=32",  # the run's own check only:
    "rollout.num_actors=1",
    "rollout.threads=1",  # the curve's points are scored afterwards (stage 3)
    "train.publish_every=100",
    "train.checkpoint_every=200",
    "train.keep_checkpoints=9",  # every checkpoint stays: the OPD study branches from early ones too
    "train.stage_timeout_s=3600",
    "resume=auto",
]


CURVE_PROMPTS, CURVE_TOKENS = 50, 128  # held-out GSM8K test prompts x new tokens of every point
SHIPPED = Path("models/smol-dflash")  # the draft the repository ships: replaced only by a better one


def ship(run: RunDir, points: list[dict], command: str, out: Path | None = None) -> bool:
    """Copy the run's final draft into `out` (default SHIPPED) in bf16, with its training config and a card, if its
    held-out tau beats the one `out` holds (or `out` holds none); True if it did."""
    out = out or SHIPPED
    final = points[-1]
    card = out / "card.json"
    if card.exists() and json.loads(card.read_text())["held_out_tau"] >= final["eval_tau"]:
        return False
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.bfloat16) for k, v in load_file(str(run.draft_dir / "model.safetensors")).items()}
    save_file(state, str(out / "model.safetensors"))
    shutil.copyfile(run.draft_dir / "config.json", out / "config.json")
    shutil.copyfile(run.config_file, out / "training_config.yaml")
    lineage = {
        "command": command,
        "steps": final["step"],
        "trained_tokens": final["trained_tokens"],
        "train_hours": round(final["train_hours"], 3),
        "held_out_tau": final["eval_tau"],
        "held_out_tau_pooled": final["eval_tau_pooled"],
        "held_out": f"GSM8K test, first {CURVE_PROMPTS} prompts x {CURVE_TOKENS} new tokens, fp32 target, "
        "text-walked tau (studies/text_eval.py)",
    }
    card.write_text(json.dumps(lineage, indent=2) + "\n")
    (out / "README.md").write_text(CARD.format(**lineage))
    return True


CARD = """# smol-dflash: an offline-SFT DFlash draft for SmolLM2-135M-Instruct

Made by this repository's own pipeline: `{command}` (offline SFT on the target's greedy answers to GSM8K
training prompts, `studies/sft_curve.py`), {steps} learner steps, {trained_tokens:.0f} label tokens,
{train_hours} h of training on 2 CPU cores. Weights in bf16 (`model.safetensors`); `config.json` is this
repository's drafter format; `training_config.yaml` is the run's resolved config.

Held-out tau: **{held_out_tau:.3f}** (pooled {held_out_tau_pooled:.3f}) on {held_out}.

Evaluate it: `make eval-smol`, or
`draft-opd eval configs/smol.yaml draft=models/smol-dflash eval.benchmarks=[gsm8k,humaneval]`.
"""


def curve(records: list[dict], taus: dict[int, dict]) -> list[dict]:
    """One point per scored step (`taus`: step -> text_tau): the label tokens and learner hours trained before it.
    Hours add each step's own time, so a pause between an interruption and its resume does not count."""
    steps, seconds = step_records(records), training_seconds(records)
    points = []
    for step in sorted(taus):
        tokens = sum(r["trained_tokens"] for s, r in steps.items() if s <= step)
        hours = max((t for s, t in seconds.items() if s <= step), default=0.0) / 3600
        points.append(
            {
                "step": step,
                "trained_tokens": tokens,
                "train_hours": hours,
                "eval_tau": taus[step]["tau_mean"],
                "eval_tau_pooled": taus[step]["tau_pooled"],
            }
        )
    return points


def score(scorer: TextScorer, run: RunDir, final_step: int) -> dict[int, dict]:
    """GSM8K text-walked tau of the initial draft, every kept checkpoint and the final draft, cached per step
    in the run's text-scores.json (a rerun scores only what is new)."""
    path = run.path / "text-scores.json"
    scores = {int(k): v for k, v in json.loads(path.read_text()).items()} if path.exists() else {}
    kept = (int(c.name.split("-")[1]) for c in run.complete_checkpoints())
    todo = {
        0: {},
        **{s: {"states": checkpoint_states(run.path, s)} for s in kept},
        final_step: {"draft": run.draft_dir},
    }
    for step, source in sorted(todo.items()):
        if step not in scores:
            scores[step] = scorer(scorer.drafter(**source), ("gsm8k",))["gsm8k"]
            path.write_text(json.dumps(scores, indent=2))
            print(f"step {step:>5}: held-out tau {scores[step]['tau_mean']:.3f}")
    return scores


def plot(points: list[dict], title: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in (
        (axes[0], "trained_tokens", "trained label tokens (millions)"),
        (axes[1], "train_hours", "training wall time (h)"),
    ):
        scale = 1e6 if key == "trained_tokens" else 1
        ax.plot([p[key] / scale for p in points], [p["eval_tau"] for p in points], marker="o")
        ax.set(xlabel=label, ylabel="held-out tau (GSM8K test)")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    return out


def make_corpus(path: str, overrides: list[str], out: str | Path = CORPUS) -> str:
    """The curve's corpus at `out` by its recipe (GENERATE): made, or completed where a run stopped; the study's
    arms from the shipped draft use it too. `draft-opd generate` makes it in a child process, so that its memory
    goes back to the system before the training runs that follow in this one: decoding in-process left the
    allocator holding gigabytes, and Ray's memory monitor then killed those runs' rollout actors."""
    keys = [f"generate.out={out}", *GENERATE, *overrides, "train.sft_corpus=null"]  # null: the corpus to be made
    job = subprocess.run([sys.executable, "-m", "draft_opd.launch.generate", path, *keys])
    if job.returncode != 0:
        raise SystemExit(f"making the corpus {out} failed (exit {job.returncode}; its error is above)")
    return str(out)


def initial_draft(cfg: Config, out: Path) -> Path:
    """An EAGLE-3 drafter over a reduced vocabulary (draft.draft_vocab_size) to train from: its head over the
    corpus's most frequent response tokens (SpecForge's recipe), each row started from the target's; made once."""
    if not (out / "model.safetensors").exists():
        target = load_target(cfg.target)
        drafter = make_drafter(cfg.draft.or_random(), target)
        drafter.restrict_vocab(
            frequent_tokens(Path(cfg.train.sft_corpus), cfg.draft.draft_vocab_size, target.vocab_size)
        )
        drafter.save(out)
    return out


def curve_dir(kind: str) -> str:
    return OUT if kind == "dflash" else f"{OUT}-{kind}"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    path, overrides = (argv[0] if argv else "configs/smol.yaml"), argv[1:]
    make_corpus(path, overrides)
    kind = load_config(path, overrides).draft.kind
    keys = [f"train.out_dir={curve_dir(kind)}", *TRAIN, *overrides]
    cfg = load_config(path, keys)
    if kind == "eagle3" and cfg.draft.draft_vocab_size and not cfg.draft.path:
        cfg = load_config(path, [*keys, f"draft={initial_draft(cfg, Path(cfg.train.out_dir) / 'init-draft')}"])
    summary = train(cfg)
    out, run = Path(cfg.train.out_dir), RunDir(Path(cfg.train.out_dir) / cfg.name)
    scorer = TextScorer(lambda *keys: load_config(path, [*keys, *overrides]), out, CURVE_PROMPTS, CURVE_TOKENS)
    points = curve(run.records(), score(scorer, run, cfg.train.sft_steps))
    (out / "curve.json").write_text(json.dumps({"summary": summary, "points": points}, indent=2))
    command = " ".join(["make curve", *([f'CURVE_ARGS="{" ".join(overrides)}"'] if overrides else [])])
    if kind == "dflash" and ship(run, points, command):  # an EAGLE-3 draft has its own LM head: too large to ship
        print(f"shipped the final draft to {SHIPPED} (held-out tau {points[-1]['eval_tau']:.3f})")
    title = (
        f"offline SFT on {cfg.name}: {cfg.draft.kind} block {cfg.draft.block_size}, "
        f"{CURVE_PROMPTS} GSM8K test prompts x {CURVE_TOKENS} tokens"
    )
    print(plot(points, title, out / "curve.png"))
    for p in points:
        print(
            f"step {p['step']:>5}  {p['trained_tokens'] / 1e6:7.2f} M tokens  {p['train_hours']:5.2f} h  "
            f"tau {p['eval_tau']:.3f}"
        )


if __name__ == "__main__":
    main()
