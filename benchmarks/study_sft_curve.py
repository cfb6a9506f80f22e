"""The offline-SFT learning curve: held-out tau against trained label tokens and wall time (`make curve`).

Why: published DFlash and EAGLE-3 drafts are trained offline on the target's own responses, and Draft-OPD
starts from such a draft. This measures how far that recipe gets on this machine. Three stages, each
resumable and skipped once done, so an interrupted `make curve` picks up where it stopped:

1. `draft-opd generate`: the target's greedy answers to GSM8K training prompts, with stored features;
2. `draft-opd train`: offline SFT on that corpus (bf16 learner, many anchors per row), with held-out
   evaluations (GSM8K test, fp32 target) every train.eval_every steps;
3. the curve: OUT/curve.json and OUT/curve.png from the run's metrics.jsonl.

    python -m benchmarks.study_sft_curve configs/smol.yaml [key=value ...]   (overrides apply to both runs)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from launch.config import load_config
from launch.generate import generate_corpus
from launch.run_dir import RunDir
from launch.train import train

OUT = "runs/curve"
GENERATE = [f"generate.out={OUT}/corpus", "generate.num_prompts=2016", "generate.batch_size=32",
            "generate.max_new_tokens=128", "generate.store_features=true",
            "target.dtype=bfloat16"]  # bf16 decodes 2x faster here; the corpus needs no bit-exact match
TRAIN = [f"train.out_dir={OUT}", "name=sft", f"train.sft_corpus={OUT}/corpus", "train.sft_steps=1500",
         "train.opd_steps=0", "learner.dtype=bfloat16", "learner.batch_size=256", "objective.sft_anchors_per_row=32",
         "learner.lr=1e-3", "learner.lr_schedule=cosine", "learner.warmup_steps=50",
         "train.eval_every=500", "train.eval_prompts=50", "train.eval_max_new_tokens=128", "train.eval_benchmark=gsm8k",
         "rollout.num_actors=1", "rollout.target_dtype=float32",  # the one actor only evaluates, in fp32, and
         "rollout.threads=1",  # on one thread: at two it shared both cores with the learner, which ran 4x slower
         "train.publish_every=100", "train.checkpoint_every=200",
         "train.keep_checkpoints=9",  # every checkpoint stays: the OPD study branches from early ones too
         "train.stage_timeout_s=3600", "resume=auto"]


def curve(records: list[dict]) -> list[dict]:
    """One point per held-out evaluation: its step, the label tokens and hours of training before it."""
    steps = {r["step"]: r for r in records if r.get("phase") in ("sft", "opd")}  # the last line of a step wins
    start = min((r["time"] for r in steps.values()), default=None)
    points, tokens, hours = [], 0, 0.0
    ordered = sorted(steps)
    evals = {r["step"]: r for r in records if "eval_tau" in r}  # the last evaluation of a step wins
    for r in (evals[s] for s in sorted(evals)):
        done = [s for s in ordered if s <= r["step"]]
        tokens = sum(steps[s]["trained_tokens"] for s in done)
        hours = (steps[done[-1]]["time"] - start) / 3600 if done else 0.0
        points.append({"step": r["step"], "trained_tokens": tokens, "train_hours": hours, "eval_tau": r["eval_tau"],
                       "eval_tau_pooled": r.get("eval_tau_pooled")})
    return points


def plot(points: list[dict], title: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "trained_tokens", "trained label tokens (millions)"),
                           (axes[1], "train_hours", "training wall time (h)")):
        scale = 1e6 if key == "trained_tokens" else 1
        ax.plot([p[key] / scale for p in points], [p["eval_tau"] for p in points], marker="o")
        ax.set(xlabel=label, ylabel="held-out tau (GSM8K test)")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    path, overrides = (argv[0] if argv else "configs/smol.yaml"), argv[1:]
    generate_corpus(load_config(path, GENERATE + overrides + ["train.sft_corpus=null"]))  # not written yet
    cfg = load_config(path, TRAIN + overrides)
    summary = train(cfg)
    points = curve(RunDir(Path(cfg.train.out_dir) / cfg.name).records())
    out = Path(cfg.train.out_dir)
    (out / "curve.json").write_text(json.dumps({"summary": summary, "points": points}, indent=2))
    title = (f"offline SFT on {cfg.name}: {cfg.draft.kind} block {cfg.draft.block_size}, "
             f"{cfg.train.eval_prompts} GSM8K test prompts x {cfg.train.eval_max_new_tokens} tokens")
    print(plot(points, title, out / "curve.png"))
    for p in points:
        print(f"step {p['step']:>5}  {p['trained_tokens'] / 1e6:7.2f} M tokens  {p['train_hours']:5.2f} h  "
              f"tau {p['eval_tau']:.3f}")


if __name__ == "__main__":
    main()
