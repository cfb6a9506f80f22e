"""Draft-OPD against continued SFT from a trained SFT draft, with ablations and seeds (`make study`).

Why: the project exists to show that on-policy distillation lifts acceptance past where SFT plateaus. Every
arm trains the same number of learner steps, with the same lr schedule, from the same start draft, which
`make curve`'s offline-SFT run wrote: `plateau` is its final draft, `early` its draft at an early checkpoint
(where OPD may or may not start to pay). Each arm is a training run, then an evaluation (`draft-opd eval`:
fp32 target, lossless checked against plain decoding); both are skipped once done and a run in progress
resumes from its checkpoint, so an interrupted study continues where it stopped.

    python -m benchmarks.study_opd configs/smol.yaml [--starts plateau,early] [--arms sft,opd,...]
                                                     [--seeds 0,1] [key=value ...]

Outputs under runs/study/: START/ARM-sSEED/ (the run directory and eval.json), START/start-eval.json (the
start draft itself), table.json and table.md (a row per start and arm: tau per benchmark as mean +- half
the range over seeds, speedup, and the cost axes: learner steps, target verify passes, wall time), and
START-curves.png (held-out tau during training against steps and against wall time).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from launch.config import load_config
from launch.eval import run_eval
from launch.run_dir import RunDir
from launch.train import train
from speculative.drafter import make_drafter
from speculative.target import load_target

STARTS = ("plateau", "early")  # the curve run's final draft; its draft at checkpoint Study.early_step
COMMON = ["learner.batch_size=64", "learner.lr=3e-4", "learner.opd_lr=3e-4", "learner.lr_schedule=cosine",
          "learner.warmup_steps=10", "train.eval_every=25", "train.eval_prompts=20", "train.eval_max_new_tokens=128",
          "train.checkpoint_every=25", "train.stage_timeout_s=3600", "resume=auto"]
ARMS = {  # name: (phase, overrides); OPD arms run the paper's defaults (forward KL + k3, decay 0.8) but for these
    "sft": ("sft", ["objective.sft_anchors_per_row=16"]),  # continued SFT on the start draft's own corpus
    "opd": ("opd", []),
    "opd-anchors-only": ("opd", ["objective.rejected_weight=0"]),
    "opd-decay1": ("opd", ["objective.opd_decay=1.0"]),
    "opd-topk": ("opd", ["objective.opd_variant=topk", "rollout.topk_logprobs=20", "buffer.topk=20"]),
    "opd-mixed": ("opd", ["objective.sft_mix=1.0"]),
}
EVAL = ["eval.benchmarks=[gsm8k,humaneval]", "eval.num_prompts=100", "eval.max_new_tokens=128"]


@dataclass
class Study:
    config: str
    out: Path = Path("runs/study")
    curve_run: Path = Path("runs/curve/sft")  # `make curve`'s offline-SFT run: the start drafts and the corpus
    early_step: int = 200  # the curve run's checkpoint that the early start takes its draft from
    steps: int = 100  # learner steps of every arm
    overrides: list[str] = field(default_factory=list)  # for every run and evaluation

    def load(self, *keys: str):
        return load_config(self.config, [*keys, *self.overrides])


def start_draft(study: Study, start: str) -> Path:
    """The start draft as a draft directory: the curve run's final draft, or the one in its checkpoint."""
    if start == "plateau":
        draft = study.curve_run / "draft"
        if not (draft / "model.safetensors").exists():
            raise SystemExit(f"no draft at {draft}: run `make curve` first (the study starts from its draft)")
        return draft
    out = study.out / start / "draft"
    if not (out / "model.safetensors").exists():
        states = RunDir(study.curve_run).checkpoint(study.early_step) / "learner" / "mp_rank_00_model_states.pt"
        if not states.exists():
            raise SystemExit(f"no checkpoint at {states}: run `make curve` (it keeps every checkpoint) first")
        cfg = study.load()
        drafter = make_drafter(replace(cfg.draft, init="random"), load_target(cfg.target))  # weights follow
        drafter.load_state_dict({k: v.float() for k, v in torch.load(states, weights_only=False)["module"].items()})
        drafter.save(out)
    return out


def evaluate(study: Study, draft: Path, out: Path) -> dict:
    """`draft-opd eval` of a draft, saved at `out`; read back when it exists."""
    if not out.exists():
        run_eval(study.load(*EVAL, f"draft={draft}", f"eval.out={out}"))
    return {s["benchmark"]: s for s in json.loads(out.read_text())["summaries"]}


def run_arm(study: Study, start: str, arm: str, seed: int, draft: Path) -> dict:
    phase, overrides = ARMS[arm]
    if phase == "sft":  # on the corpus the start draft was trained on
        corpus = load_config(study.curve_run / "config.yaml").train.sft_corpus
        phases = [f"train.sft_steps={study.steps}", "train.opd_steps=0", f"train.sft_corpus={corpus}"]
    else:
        phases = ["train.sft_steps=0", f"train.opd_steps={study.steps}", "train.sft_corpus=null"]
    cfg = study.load(*COMMON, *phases, *overrides, f"draft={draft}", f"learner.seed={seed}",
                     f"buffer.seed={seed}", f"train.out_dir={study.out / start}", f"name={arm}-s{seed}")
    summary = train(cfg)
    run = RunDir(Path(cfg.train.out_dir) / cfg.name)
    steps = [r for r in run.records() if r.get("phase") in ("sft", "opd")]
    evals = evaluate(study, run.draft_dir, run.path / "eval.json")
    return {"start": start, "arm": arm, "seed": seed, "evals": evals, "steps": len(steps),
            "verify_steps": sum(r.get("verify_steps", 0) for r in steps), "wall_s": summary["wall_s"],
            "curve": [(r["step"], r.get("time"), r["eval_tau"]) for r in run.records() if "eval_tau" in r]}


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, half the range): with two seeds, the distance from the mean to either."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def table(results: list[dict], starts: dict[str, dict]) -> tuple[list[dict], str]:
    benchmarks = sorted({b for r in results for b in r["evals"]} | {b for e in starts.values() for b in e})
    rows, lines = [], ["| start | arm | seeds | " + " | ".join(f"tau {b}" for b in benchmarks)
                       + " | speedup (gsm8k) | learner steps | target verify passes | wall min |",
                       "|" + "---|" * (len(benchmarks) + 7)]
    for start, evals in starts.items():
        cells = [f"{evals[b]['tau_mean']:.3f}" if b in evals else "-" for b in benchmarks]
        speed = evals.get("gsm8k", {}).get("speedup")
        lines.append(f"| {start} | (start draft) | - | " + " | ".join(cells) +
                     (f" | {speed:.2f}x" if speed else " | -") + " | 0 | 0 | 0 |")
    for start, arm in dict.fromkeys((r["start"], r["arm"]) for r in results):
        group = [r for r in results if (r["start"], r["arm"]) == (start, arm)]
        row = {"start": start, "arm": arm, "seeds": [r["seed"] for r in group]}
        cells = []
        for b in benchmarks:
            taus = [r["evals"][b]["tau_mean"] for r in group if b in r["evals"]]
            row[f"tau_{b}"] = spread(taus) if taus else None
            cells.append(f"{row[f'tau_{b}'][0]:.3f} +- {row[f'tau_{b}'][1]:.3f}" if taus else "-")
        speedups = [r["evals"]["gsm8k"]["speedup"] for r in group if "gsm8k" in r["evals"]]
        row["speedup_gsm8k"] = spread(speedups) if speedups else None
        for key in ("steps", "verify_steps", "wall_s"):
            row[key] = statistics.fmean(r[key] for r in group)
        rows.append(row)
        lines.append(f"| {start} | {arm} | {len(group)} | " + " | ".join(cells) +
                     (f" | {row['speedup_gsm8k'][0]:.2f}x" if speedups else " | -") +
                     f" | {row['steps']:.0f} | {row['verify_steps']:.0f} | {row['wall_s'] / 60:.0f} |")
    return rows, "\n".join(lines) + "\n"


def plot(results: list[dict], start: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for r in (r for r in results if r["start"] == start):
        steps, times, taus = zip(*r["curve"])
        t0 = next(t for t in times if t is not None)
        label = f"{r['arm']} s{r['seed']}"
        axes[0].plot(steps, taus, marker="o", label=label)
        axes[1].plot([((t or t0) - t0) / 60 for t in times], taus, marker="o", label=label)
    for ax, xlabel in zip(axes, ("learner step", "wall time (min)")):
        ax.set(xlabel=xlabel, ylabel="held-out tau during training (GSM8K test)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"Draft-OPD study from the {start} draft")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--starts", default=",".join(STARTS))
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", type=Path, default=Study.out)
    parser.add_argument("--curve-run", type=Path, default=Study.curve_run)
    parser.add_argument("--early-step", type=int, default=Study.early_step)
    parser.add_argument("--steps", type=int, default=Study.steps)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every run and evaluation")
    args = parser.parse_intermixed_args(argv)
    starts, arms = args.starts.split(","), args.arms.split(",")
    unknown = [s for s in starts if s not in STARTS] + [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown start or arm {unknown}: starts are {list(STARTS)}, arms {list(ARMS)}")
    study = Study(args.config, args.out, args.curve_run, args.early_step, args.steps, args.overrides)
    results, start_evals = [], {}
    for start in starts:
        draft = start_draft(study, start)
        start_evals[start] = evaluate(study, draft, study.out / start / "start-eval.json")
        for arm in arms:
            for seed in map(int, args.seeds.split(",")):
                results.append(run_arm(study, start, arm, seed, draft))
    rows, markdown = table(results, start_evals)
    (study.out / "table.json").write_text(json.dumps({"rows": rows, "runs": results}, indent=2))
    (study.out / "table.md").write_text(markdown)
    print(markdown)
    for start in starts:
        print(plot(results, start, study.out / f"{start}-curves.png"))


if __name__ == "__main__":
    main()
