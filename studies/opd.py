"""Draft-OPD against continued SFT from a trained SFT draft, with ablations and seeds (`make study`).

Why: the project exists to show that on-policy distillation lifts acceptance past where SFT plateaus. Every
arm trains the same number of learner steps, with the same lr schedule, from the same start draft, which
`make curve`'s offline-SFT run wrote: `plateau` is its final draft, `early` its draft at an early checkpoint
(where OPD may or may not start to pay). Each arm is a training run, then its scoring:
- held-out tau of every checkpoint on Study.text_prompts GSM8K test prompts, and of the final draft on
  GSM8K and HumanEval, walked on the target's greedy text (`studies.text_eval`: fp32 target, the accept
  lengths decoding would record, drafter passes only, so hundreds of prompts per checkpoint are affordable);
- `draft-opd eval` of the final draft on Study.decode_prompts GSM8K prompts: decoded tau, speedup, lossless.
Runs and scores are skipped once done and a run in progress resumes from its checkpoint, so an interrupted
study continues where it stopped. With `--record DIR` (e.g. results/map/dflash-T0) every finished arm's and
start's results are also kept there, small JSON to commit: a later clone, with runs/ gone, reads them back and
trains only the arms still missing, so a study can outgrow one session.

    python -m draft_opd.studies.opd configs/smol.yaml [--starts plateau,early,shipped] [--arms sft,opd,...]
                                                     [--seeds 0,1] [--temperature 1.0] [--record DIR] [key=value ...]

Outputs under runs/study/: START/ARM-sSEED/ (the run directory, scores.json and eval.json), START/ (the start
draft's scores), reference-*.pt (the target's texts), table.json and table.md (a row per start and arm: tau
per benchmark as mean +- half the range over seeds, decoded tau and speedup, and the cost axes: learner
steps, target verify passes, training time), and START-curves.png (tau against steps and against training time).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path

from draft_opd.launch.config import load_config
from draft_opd.launch.eval import run_eval
from draft_opd.launch.run_dir import RunDir, step_records, training_seconds
from draft_opd.launch.train import train
from draft_opd.learner.presets import PRESETS
from draft_opd.studies.sft_curve import CORPUS, SHIPPED, make_corpus
from draft_opd.studies.text_eval import TextScorer, checkpoint_states

# the curve run's final draft; its draft at checkpoint Study.early_step; the draft the repository ships (a curve's
# final draft, see its card), whose continued-SFT arms train on the curve's corpus, made again where runs/ lacks it
STARTS = ("plateau", "early", "shipped")
COMMON = [
    "learner.batch_size=64",
    "learner.lr=3e-4",
    "learner.opd_lr=3e-4",
    "learner.lr_schedule=cosine",
    "learner.warmup_steps=10",
    "train.eval_every=0",
    "train.eval_prompts=2",
    "train.eval_max_new_tokens=32",
    "train.checkpoint_every=50",
    "train.keep_checkpoints=100",
    "train.stage_timeout_s=3600",
    "resume=auto",
]
ARMS = {  # name: (phase, overrides); the OPD arms are the objective presets (learner.presets), the paper's first
    "sft": ("sft", ["objective.sft_anchors_per_row=16"]),  # continued SFT on the start draft's own corpus
    "sft-soft": ("sft", ["objective.sft_anchors_per_row=16", "objective.sft_targets=soft"]),  # the target's soft labels
    "opd": ("opd", ["objective.preset=paper"]),
    **{f"opd-{name}": ("opd", [f"objective.preset={name}"]) for name in PRESETS if name != "paper"},
}
TEXT = ("gsm8k", "humaneval")  # benchmarks of the final drafts' text-walked tau; checkpoints get the first


@dataclass
class Study:
    config: str
    out: Path = Path("runs/study")
    curve_run: Path = Path("runs/curve/sft")  # `make curve`'s offline-SFT run: the start drafts and the corpus
    early_step: int = 200  # the curve run's checkpoint that the early start takes its draft from
    shipped: Path = SHIPPED  # the shipped start's draft
    corpus: Path = Path(CORPUS)  # the shipped start's corpus (`make curve`'s recipe)
    record: str = ""  # a folder that keeps every finished arm's results (see the module's docstring); "": none
    steps: int = 100  # learner steps of every arm
    text_prompts: int = 100  # prompts per benchmark of the text-walked tau
    # GSM8K prompts of the decoded evaluation (speedup, lossless): ~3 min a draft here; 0: none
    decode_prompts: int = 10
    max_new_tokens: int = 128
    # the serving temperature the arms train for: T > 0 rolls out (sequentially) and scores at T, the held-out
    # texts and the decoded evaluation at `sampling_seeds` seeds per prompt
    temperature: float = 0.0
    sampling_seeds: int = 2
    overrides: list[str] = field(default_factory=list)  # for every run and evaluation

    def load(self, *keys: str):
        t = self.temperature
        sampling = [f"rollout.temperature={t}", f"eval.temperature={t}", f"eval.seeds={self.sampling_seeds}"]
        return load_config(self.config, [*(sampling if t > 0 else []), *keys, *self.overrides])


def start_draft(study: Study, scorer: TextScorer, start: str) -> Path:
    """The start draft as a draft directory: the curve run's final draft, or the one in its checkpoint."""
    if start in ("plateau", "shipped"):
        draft = study.curve_run / "draft" if start == "plateau" else study.shipped
        if not (draft / "model.safetensors").exists():
            raise SystemExit(f"no draft at {draft}: run `make curve` first (the study starts from its draft)")
        return draft
    out = study.out / start / "draft"
    if not (out / "model.safetensors").exists():
        scorer.drafter(states=checkpoint_states(study.curve_run, study.early_step)).save(out)
    return out


def cached(path: Path, compute) -> dict:
    """`compute()`, saved as JSON at `path`; read back when it exists."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(compute(), indent=2))
    return json.loads(path.read_text())


def recorded(study: Study, name: str, compute) -> dict:
    """`compute()`, kept at Study.record/name when the study has a record folder."""
    return cached(Path(study.record) / name, compute) if study.record else compute()


@cache
def shipped_corpus(config: str, overrides: tuple[str, ...], out: str) -> str:
    """make_corpus once a process (each call loads the target and reads the whole corpus to find it complete)."""
    return make_corpus(config, list(overrides), out)


def sft_corpus(study: Study, start: str) -> str:
    """The corpus of the start draft's offline SFT, which the continued-SFT arm trains on."""
    if start == "shipped":
        return shipped_corpus(study.config, tuple(study.overrides), str(study.corpus))
    return load_config(study.curve_run / "config.yaml").train.sft_corpus


def decoded(study: Study, draft: Path, out: Path) -> dict | None:
    """`draft-opd eval` of a draft on Study.decode_prompts GSM8K prompts, saved at `out`; None with 0 prompts (at
    T = 0 text-walked tau already equals decoded tau, so a large grid may skip the decoding)."""
    if not study.decode_prompts:
        return None
    if not out.exists():
        run_eval(
            study.load(
                "eval.benchmarks=[gsm8k]",
                f"eval.num_prompts={study.decode_prompts}",
                f"eval.max_new_tokens={study.max_new_tokens}",
                f"draft={draft}",
                f"eval.out={out}",
            )
        )
    return json.loads(out.read_text())["summaries"][0]


def score_draft(study: Study, scorer: TextScorer, draft: Path, out: Path) -> dict:
    """A final or start draft: text-walked tau on every TEXT benchmark, and the decoded evaluation."""
    text = cached(out / "scores.json", lambda: scorer(scorer.drafter(draft), TEXT))
    return {"text": text, "decoded": decoded(study, draft, out / "eval.json")}


def score_start(study: Study, scorer: TextScorer, start: str) -> dict:
    return score_draft(study, scorer, start_draft(study, scorer, start), study.out / start)


def score_run(study: Study, scorer: TextScorer, run: RunDir, start_tau: float) -> list:
    """(step, training seconds, GSM8K text-walked tau) at step 0 (the start draft), every kept checkpoint and the
    end. Seconds add each step's own time (rollout waits included), so a resumed run's pause does not count."""
    steps = sorted(int(c.name.split("-")[1]) for c in run.complete_checkpoints())

    def compute() -> list:
        points = [(0, start_tau)]
        for step in (s for s in steps if s < study.steps):
            drafter = scorer.drafter(states=checkpoint_states(run.path, step))
            points.append((step, scorer(drafter, TEXT[:1])[TEXT[0]]["tau_mean"]))
        final = cached(run.path / "scores.json", lambda: scorer(scorer.drafter(run.draft_dir), TEXT))
        return points + [(study.steps, final[TEXT[0]]["tau_mean"])]

    seconds = training_seconds(run.records())
    taus = cached(run.path / "curve.json", lambda: {"points": compute()})["points"]
    return [(point[0], seconds.get(point[0], 0.0), point[-1]) for point in taus]


def run_arm(
    study: Study, scorer: TextScorer, start: str, arm: str, seed: int, draft: Callable[[], Path], start_tau: float
) -> dict:
    """One arm's training run from the start draft (`draft()`, resolved only when the arm trains) and its scores."""
    phase, overrides = ARMS[arm]
    if phase == "sft":  # on the corpus the start draft was trained on
        corpus = sft_corpus(study, start)
        phases = [f"train.sft_steps={study.steps}", "train.opd_steps=0", f"train.sft_corpus={corpus}"]
    else:  # at T = 0 the rollouts take the greedy texts of the same corpus instead of decoding them again
        texts = [f"rollout.text_corpus={sft_corpus(study, start)}"] if study.temperature == 0 else []
        phases = ["train.sft_steps=0", f"train.opd_steps={study.steps}", "train.sft_corpus=null", *texts]
    cfg = study.load(
        *COMMON,
        *phases,
        *overrides,
        f"draft={draft()}",
        f"learner.seed={seed}",
        f"buffer.seed={seed}",
        f"train.out_dir={study.out / start}",
        f"name={arm}-s{seed}",
    )
    train(cfg)
    run = RunDir(Path(cfg.train.out_dir) / cfg.name)
    steps = step_records(run.records()).values()
    curve = score_run(study, scorer, run, start_tau)
    return {
        "start": start,
        "arm": arm,
        "seed": seed,
        **score_draft(study, scorer, run.draft_dir, run.path),
        "steps": len(steps),
        "verify_steps": sum(r.get("verify_steps", 0) for r in steps),
        "train_s": curve[-1][1],
        "curve": curve,
    }


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, half the range): with two seeds, the distance from the mean to either."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def paired_gain(group: list[dict], baseline: list[dict], benchmark: str) -> tuple[float, float | None] | None:
    """(mean, 95 % t-interval half-width) of an arm's per-seed tau difference to the baseline arm on `benchmark`,
    paired by seed over the seeds both ran; no width from one seed, None from none."""
    base = {r["seed"]: r["text"][benchmark]["tau_mean"] for r in baseline}
    diffs = [r["text"][benchmark]["tau_mean"] - base[r["seed"]] for r in group if r["seed"] in base]
    if len(diffs) < 2:
        return (diffs[0], None) if diffs else None
    from scipy import stats  # a dev dependency, as matplotlib for the plots

    return statistics.fmean(diffs), float(stats.t.ppf(0.975, len(diffs) - 1)) * statistics.stdev(diffs) / len(
        diffs
    ) ** 0.5


def gain_cell(gain: tuple[float, float | None] | None) -> str:
    if gain is None:
        return "-"
    return f"{gain[0]:+.3f}" + ("" if gain[1] is None else f" +- {gain[1]:.3f}")


def decoded_cells(tau: float | None, speedup: float | None, lossless: bool | None) -> str:
    """The decoded evaluation's cells, dashes where the study decoded nothing (--decode-prompts 0)."""
    if tau is None:
        return "- | - | -"
    return f"{tau:.2f} | {speedup:.2f}x | {str(lossless).lower()}"


def arm_row(start: str, arm: str, group: list[dict], baseline: list[dict], benchmarks: list[str]) -> dict:
    """A (start, arm) row: tau per benchmark as mean +- half the range over seeds, the gain over the
    baseline (continued SFT), the decoded evaluation and the cost axes."""
    row = {"start": start, "arm": arm, "seeds": [r["seed"] for r in group]}
    for b in benchmarks:
        row[f"tau_{b}"] = spread([r["text"][b]["tau_mean"] for r in group])
        row[f"vs_sft_{b}"] = None if arm == "sft" else paired_gain(group, baseline, b)
    dec = [r["decoded"] for r in group]
    row["decoded_tau_gsm8k"] = spread([d["tau_mean"] for d in dec]) if all(dec) else None
    row["speedup_gsm8k"] = spread([d["speedup"] for d in dec]) if all(dec) else None
    row["lossless"] = all(d["lossless"] for d in dec) if all(dec) else None
    for key in ("steps", "verify_steps", "train_s"):
        row[key] = statistics.fmean(r[key] for r in group)
    return row


def table(results: list[dict], starts: dict[str, dict]) -> tuple[list[dict], str]:
    """A row per start draft and per (start, arm); `starts` maps a start to its score_draft."""
    benchmarks = sorted({b for r in [*results, *starts.values()] for b in r["text"]})
    first = TEXT[0] if TEXT[0] in benchmarks else benchmarks[0]
    lines = [
        "| start | arm | seeds | "
        + " | ".join(f"tau {b}" for b in benchmarks)
        + f" | {first} vs sft (95% CI) | decoded tau (gsm8k) | speedup | lossless | learner steps | "
        "target verify passes | train min |",
        "|" + "---|" * (len(benchmarks) + 10),
    ]
    for start, scores in starts.items():
        cells = [f"{scores['text'][b]['tau_mean']:.3f}" for b in benchmarks]
        dec = scores["decoded"] or {}
        lines.append(
            f"| {start} | (start draft) | - | " + " | ".join(cells) + " | - | "
            f"{decoded_cells(dec.get('tau_mean'), dec.get('speedup'), dec.get('lossless'))} | 0 | 0 | 0 |"
        )
    rows = []
    for start, arm in dict.fromkeys((r["start"], r["arm"]) for r in results):
        group = [r for r in results if (r["start"], r["arm"]) == (start, arm)]
        baseline = [r for r in results if (r["start"], r["arm"]) == (start, "sft")]
        row = arm_row(start, arm, group, baseline, benchmarks)
        rows.append(row)
        cells = [f"{row[f'tau_{b}'][0]:.3f} +- {row[f'tau_{b}'][1]:.3f}" for b in benchmarks]
        tau, speedup = (row[k][0] if row[k] else None for k in ("decoded_tau_gsm8k", "speedup_gsm8k"))
        lines.append(
            f"| {start} | {arm} | {len(group)} | "
            + " | ".join(cells)
            + f" | {gain_cell(row[f'vs_sft_{first}'])} | {decoded_cells(tau, speedup, row['lossless'])} | "
            f"{row['steps']:.0f} | {row['verify_steps']:.0f} | {row['train_s'] / 60:.1f} |"
        )
    return rows, "\n".join(lines) + "\n"


def plot(results: list[dict], start: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.2))
    palette = plt.get_cmap("tab20").colors  # one colour per arm (more arms than colours reuse them), a style per seed
    colors = {arm: palette[i % len(palette)] for i, arm in enumerate(ARMS)}
    styles = {"-": "solid", "--": "dashed", ":": "dotted", "-.": "dash-dot"}
    runs = [r for r in results if r["start"] == start]
    seeds = sorted({r["seed"] for r in runs})
    labelled = set()
    for r in runs:
        steps, seconds, taus = zip(*r["curve"])
        style = {
            "color": colors[r["arm"]],
            "linestyle": list(styles)[r["seed"] % 4],
            "marker": "o",
            "label": None if r["arm"] in labelled else r["arm"],
        }
        labelled.add(r["arm"])
        axes[0].plot(steps, taus, **style)
        axes[1].plot([s / 60 for s in seconds], taus, **style)
    for ax, xlabel in zip(axes, ("learner step", "training time, rollouts included (min)")):
        ax.set(xlabel=xlabel, ylabel="held-out tau (GSM8K test, text-walked)")
        ax.grid(alpha=0.3)
    fig.legend(
        *axes[0].get_legend_handles_labels(),
        loc="center right",
        fontsize=8,
        title="\n".join(["arm", *(f"seed {s}: {list(styles.values())[s % 4]}" for s in seeds)]),
        title_fontsize=8,
    )
    fig.subplots_adjust(left=0.05, right=0.82, bottom=0.13, wspace=0.22)
    fig.suptitle(f"Draft-OPD study from the {start} draft")
    fig.savefig(out, dpi=90)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--starts", default="plateau,early")  # shipped: a study without `make curve` first
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seeds", default="0,1")
    options = ("out", "curve_run", "early_step", "shipped", "corpus", "record", "steps", "text_prompts")
    options += ("decode_prompts", "max_new_tokens", "temperature", "sampling_seeds")
    for name in options:
        default = getattr(Study, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every run and evaluation")
    args = parser.parse_intermixed_args(argv)
    starts, arms = args.starts.split(","), args.arms.split(",")
    unknown = [s for s in starts if s not in STARTS] + [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown start or arm {unknown}: starts are {list(STARTS)}, arms {list(ARMS)}")
    study = Study(args.config, **{name: getattr(args, name) for name in options}, overrides=args.overrides)
    scorer = TextScorer(study.load, study.out, study.text_prompts, study.max_new_tokens)
    results, start_scores = [], {}
    for start in starts:
        start_scores[start] = recorded(study, f"{start}/start.json", partial(score_start, study, scorer, start))
        tau = start_scores[start]["text"][TEXT[0]]["tau_mean"]
        for arm in arms:
            for seed in map(int, args.seeds.split(",")):
                run = partial(run_arm, study, scorer, start, arm, seed, partial(start_draft, study, scorer, start), tau)
                results.append(recorded(study, f"{start}/{arm}-s{seed}.json", run))
                write_outputs(study, results, start_scores)
    outputs = outputs_dirs(study)
    print((outputs[-1] / "table.md").read_text())
    for start in starts:
        print(*(plot(results, start, out / f"{start}-curves.png") for out in outputs))


def outputs_dirs(study: Study) -> list[Path]:
    """Where the table and plots go: the study's folder, and its record folder if it has one."""
    return [study.out, *([Path(study.record)] if study.record else [])]


def write_outputs(study: Study, results: list[dict], start_scores: dict[str, dict]) -> None:
    """The table so far: a long study shows its finished arms while the next one trains."""
    rows, markdown = table(results, start_scores)
    for out in outputs_dirs(study):
        out.mkdir(parents=True, exist_ok=True)
        (out / "table.json").write_text(json.dumps({"rows": rows, "runs": results}, indent=2))
        (out / "table.md").write_text(markdown)


if __name__ == "__main__":
    main()
