"""The study scripts' bookkeeping: learning-curve points from a run's metrics lines."""

import json
import shutil

import pytest
import ray

from draft_opd.studies import opd as study_opd
from draft_opd.studies import sft_curve as study_sft_curve
from draft_opd.studies.opd import table
from draft_opd.studies.sft_curve import curve


def test_curve_points_count_the_tokens_and_time_trained_before_each_scored_step():
    records = [
        {"step": 0, "phase": "init", "eval_tau": 1.0},
        {"step": 1, "phase": "sft", "trained_tokens": 100, "time": 1000.0, "step_s": 360.0},
        {"step": 2, "phase": "sft", "trained_tokens": 999, "time": 1500.0, "step_s": 9.0},  # logged before a resume
        {"step": 2, "phase": "sft", "trained_tokens": 120, "time": 9710.0, "step_s": 360.0},  # ... after it: wins
        {"phase": "fault", "fault": "learner failed", "time": 9750.0},
        {"step": 3, "phase": "sft", "trained_tokens": 80, "time": 12590.0, "step_s": 2880.0},
        {"step": 3, "phase": "final", "eval_tau": 2.0},
    ]
    taus = {
        3: {"tau_mean": 2.0, "tau_pooled": 1.9},
        0: {"tau_mean": 1.0, "tau_pooled": 1.0},
        2: {"tau_mean": 1.5, "tau_pooled": 1.4},
    }
    points = curve(records, taus)
    assert [p["step"] for p in points] == [0, 2, 3]
    assert [p["trained_tokens"] for p in points] == [0, 220, 300]
    assert [p["train_hours"] for p in points] == pytest.approx(
        [0.0, 0.2, 1.0]
    )  # the pause before a resume is not counted
    assert [p["eval_tau"] for p in points] == [1.0, 1.5, 2.0]
    assert points[1]["eval_tau_pooled"] == 1.4


def scores(tau: float, speedup: float) -> dict:
    return {
        "text": {"gsm8k": {"tau_mean": tau}, "humaneval": {"tau_mean": tau - 1}},
        "decoded": {"tau_mean": tau + 0.1, "speedup": speedup, "lossless": True},
    }


def arm(seed: int, tau: float, speedup: float, verify_steps: int) -> dict:
    return {
        "start": "plateau",
        "arm": "opd",
        "seed": seed,
        "steps": 100,
        "verify_steps": verify_steps,
        "train_s": 600.0 * (seed + 1),
        "curve": [],
        **scores(tau, speedup),
    }


def test_study_table_gives_mean_and_half_range_over_seeds():
    rows, markdown = table([arm(0, 2.0, 1.2, 300), arm(1, 2.4, 1.4, 500)], {"plateau": scores(1.9, 1.1)})
    (row,) = rows
    assert row["seeds"] == [0, 1]
    assert row["tau_gsm8k"] == pytest.approx((2.2, 0.2)) and row["tau_humaneval"] == pytest.approx((1.2, 0.2))
    assert row["decoded_tau_gsm8k"] == pytest.approx((2.3, 0.2))
    assert row["speedup_gsm8k"] == pytest.approx((1.3, 0.1))
    assert (row["verify_steps"], row["train_s"]) == (400, 900)
    lines = markdown.splitlines()
    assert lines[2] == "| plateau | (start draft) | - | 1.900 | 0.900 | - | 2.00 | 1.10x | true | 0 | 0 | 0 |"
    assert lines[3] == (
        "| plateau | opd | 2 | 2.200 +- 0.200 | 1.200 +- 0.200 | - | 2.30 | 1.30x | true | 100 | 400 | 15.0 |"
    )


def test_every_arm_gets_a_colour_in_the_plot(tmp_path):
    runs = [{**arm(0, 2.0, 1.0, 0), "arm": name, "curve": [(0, 0.0, 1.9), (10, 60.0, 2.0)]} for name in study_opd.ARMS]
    assert study_opd.plot(runs, "plateau", tmp_path / "curves.png").stat().st_size > 0


def test_an_arms_gain_over_continued_sft_is_paired_by_seed_with_a_t_interval():
    """Gains 0.10, 0.30, 0.20 over the sft arm's seeds: mean 0.2, sd 0.1, t(0.975, 2) = 4.303 -> +- 0.248; seed 3
    has no sft pair and is left out. Without decoding the decoded cells are dashes."""
    sft = [{**arm(s, tau, 1.0, 0), "arm": "sft", "decoded": None} for s, tau in enumerate([2.0, 2.1, 2.2])]
    opd = [{**arm(s, tau, 1.0, 9), "decoded": None} for s, tau in enumerate([2.1, 2.4, 2.4, 9.0])]
    rows, markdown = table([*sft, *opd], {"plateau": {**scores(1.9, 1.1), "decoded": None}})
    assert rows[0]["vs_sft_gsm8k"] is None and rows[0]["decoded_tau_gsm8k"] is None
    mean, half = rows[1]["vs_sft_gsm8k"]
    assert mean == pytest.approx(0.2) and half == pytest.approx(4.302653 * 0.1 / 3**0.5, rel=1e-5)
    line = markdown.splitlines()[4]
    assert line.startswith("| plateau | opd | 4 |") and "| +0.200 +- 0.248 | - | - | - |" in line
    one = table([sft[0], opd[0]], {})[0][1]["vs_sft_humaneval"]
    assert one[0] == pytest.approx(0.1) and one[1] is None  # one pair: a gain, no interval


TINY_EVALS = [
    "train.eval_prompts=2",
    "train.eval_max_new_tokens=16",
    "eval.benchmarks=[gsm8k]",
    "eval.num_prompts=2",
    "eval.max_new_tokens=16",
    "learner.batch_size=16",
    "learner.warmup_steps=1",
    "train.checkpoint_every=2",
    "train.eval_every=2",
    "buffer.min_size_to_sample=3",
    "buffer.timeout_s=120",
    "buffer.samples_per_insert=16",
    "buffer.ratio_tolerance=64",
    "rollout.num_prompts=4",
    "rollout.max_new_tokens=32",
]


@pytest.mark.slow
def test_study_runs_its_arms_from_both_starts_and_a_rerun_answers_from_disk(tmp_path, monkeypatch):
    """make curve then make study at tiny sizes: the early start is the curve's checkpoint draft, every arm trains
    and is evaluated, the table lists them, and a second study call trains nothing (everything is on disk)."""
    monkeypatch.setattr(study_sft_curve, "SHIPPED", tmp_path / "shipped")  # never the repository's models/
    try:
        run_curve_then_study(tmp_path)
    finally:
        ray.shutdown()  # the study's jobs share one in-process cluster: later tests start their own


def run_curve_then_study(tmp_path):
    curve = tmp_path / "curve"
    study_sft_curve.main(
        [
            "configs/tiny.yaml",
            f"generate.out={curve}/corpus",
            "generate.num_prompts=6",
            "generate.max_new_tokens=32",
            f"train.out_dir={curve}",
            f"train.sft_corpus={curve}/corpus",
            "train.sft_steps=4",
            "objective.sft_anchors_per_row=4",
            *TINY_EVALS,
        ]
    )
    assert [p["step"] for p in json.loads((curve / "curve.json").read_text())["points"]] == [0, 2, 4]
    args = [
        "configs/tiny.yaml",
        "--out",
        str(tmp_path / "study"),
        "--curve-run",
        str(curve / "sft"),
        "--early-step",
        "2",
        "--steps",
        "4",
        "--arms",
        "sft,opd-anchors-only",
        "--seeds",
        "0",
        "--text-prompts",
        "3",
        "--decode-prompts",
        "2",
        "--max-new-tokens",
        "16",
        *TINY_EVALS,
    ]
    study_opd.main(args)
    table = json.loads((tmp_path / "study" / "table.json").read_text())
    assert [(r["start"], r["arm"]) for r in table["rows"]] == [
        ("plateau", "sft"),
        ("plateau", "opd-anchors-only"),
        ("early", "sft"),
        ("early", "opd-anchors-only"),
    ]
    assert all(r["steps"] == 4 and r["tau_gsm8k"][0] >= 1.0 and r["lossless"] for r in table["rows"])
    # the curve: the start draft, the checkpoint at step 2 (checkpoint_every) and the final draft
    assert all([p[0] for p in r["curve"]] == [0, 2, 4] for r in table["runs"])
    assert all(r["curve"][0][1] == 0 < r["curve"][1][1] < r["curve"][2][1] for r in table["runs"])  # training s
    opd = [r for r in table["runs"] if r["arm"] == "opd-anchors-only"]
    assert all(r["verify_steps"] > 0 for r in opd)  # OPD's cost axis: the rollouts' target passes
    config = (tmp_path / "study" / "plateau" / "opd-anchors-only-s0" / "config.yaml").read_text()
    assert f"text_corpus: {curve / 'corpus'}" in config  # at T = 0 the rollouts take the corpus's greedy texts
    early = (tmp_path / "study" / "early" / "draft" / "model.safetensors").read_bytes()
    assert early != (curve / "sft" / "draft" / "model.safetensors").read_bytes()
    stamp = (tmp_path / "study" / "plateau" / "sft-s0" / "scores.json").stat().st_mtime
    study_opd.main(args)
    assert (tmp_path / "study" / "plateau" / "sft-s0" / "scores.json").stat().st_mtime == stamp
    assert json.loads((tmp_path / "study" / "table.json").read_text())["rows"] == table["rows"]
    study_from_the_shipped_draft_with_a_record(tmp_path, curve, args)


def study_from_the_shipped_draft_with_a_record(tmp_path, curve, args):
    """The shipped start trains its continued-SFT arm on the corpus it names; its record folder keeps each arm's
    results, so a clone whose runs/ is gone reads them back and trains nothing."""
    record, out = tmp_path / "record", tmp_path / "study-shipped"
    shipped = ["--starts", "shipped", "--shipped", str(curve / "sft" / "draft"), "--corpus", str(curve / "corpus")]
    again = [*args, *shipped, "--arms", "sft", "--out", str(out), "--record", str(record)]
    study_opd.main(again)
    kept = json.loads((record / "shipped" / "sft-s0.json").read_text())
    assert kept["steps"] == 4 and kept["start"] == "shipped" and (record / "shipped" / "start.json").exists()
    config = (out / "shipped" / "sft-s0" / "config.yaml").read_text()
    assert f"sft_corpus: {curve / 'corpus'}" in config and f"path: {curve / 'sft' / 'draft'}" in config
    shutil.rmtree(out)  # runs/ of a fresh clone: only the record is left
    study_opd.main(again)
    assert not (out / "shipped" / "sft-s0").exists()  # read back from the record, not trained again
    assert json.loads((out / "table.json").read_text()) == json.loads((record / "table.json").read_text())
    assert json.loads((record / "table.json").read_text())["runs"] == [kept]


def test_ship_writes_a_loadable_bf16_draft_and_keeps_a_better_one(tmp_path, tiny_target):
    import torch
    from safetensors.torch import load_file

    from draft_opd.launch.run_dir import RunDir
    from draft_opd.speculative.drafter import DrafterConfig
    from draft_opd.speculative.loading import build_drafter, load_drafter
    from draft_opd.studies.sft_curve import ship

    run = RunDir(tmp_path / "run")
    drafter = build_drafter(DrafterConfig(kind="dflash", block_size=4, mask_token_id=259), tiny_target)
    drafter.save(run.draft_dir)
    run.config_file.write_text("name: sft\n")
    point = {"step": 10, "trained_tokens": 100.0, "train_hours": 0.01, "eval_tau": 1.5, "eval_tau_pooled": 1.4}
    out = tmp_path / "models" / "smol-dflash"
    assert ship(run, [point], "make curve", out)
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    loaded = load_drafter(out, tiny_target)
    for name, value in drafter.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.to(torch.bfloat16).to(value.dtype)), name
    assert "1.500" in (out / "README.md").read_text() and "make curve" in (out / "README.md").read_text()
    assert not ship(run, [{**point, "eval_tau": 1.4}], "make curve", out)  # not better: the shipped one stays
    assert json.loads((out / "card.json").read_text())["held_out_tau"] == 1.5
    assert ship(run, [{**point, "eval_tau": 1.6}], "make curve", out)


@pytest.mark.slow
def test_an_eagle3_curve_goes_beside_dflash_on_the_same_corpus_and_ships_nothing(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from draft_opd.launch.generate import frequent_tokens

    monkeypatch.chdir(tmp_path)  # runs/ and models/ of the tool's defaults land here
    try:
        study_sft_curve.main(
            [
                "tiny",
                "draft.kind=eagle3",
                "draft.num_layers=1",
                "draft.draft_vocab_size=64",
                "generate.num_prompts=6",
                "generate.max_new_tokens=32",
                "train.sft_steps=2",
                "objective.sft_anchors_per_row=4",
                *TINY_EVALS,
            ]
        )
    finally:
        ray.shutdown()
    points = json.loads((tmp_path / "runs" / "curve-eagle3" / "curve.json").read_text())["points"]
    assert [p["step"] for p in points] == [0, 2]
    config = (tmp_path / "runs" / "curve-eagle3" / "sft" / "config.yaml").read_text()
    assert "kind: eagle3" in config and "sft_corpus: runs/curve/corpus" in config
    assert not (tmp_path / "models").exists()  # an EAGLE-3 draft carries its own LM head: not shipped
    # its head is over the corpus's 64 most frequent response tokens, chosen before training
    assert "path: runs/curve-eagle3/init-draft" in config
    trained = load_file(str(tmp_path / "runs" / "curve-eagle3" / "sft" / "draft" / "model.safetensors"))["d2t"]
    assert torch.equal(trained, frequent_tokens(tmp_path / "runs" / "curve" / "corpus", 64, 320).sort().values)


def test_a_study_at_t1_rolls_out_scores_and_decodes_at_t1_with_seeds():
    cfg = study_opd.Study("configs/tiny.yaml", temperature=1.0).load("train.opd_steps=3")
    assert (cfg.rollout.temperature, cfg.eval.temperature, cfg.eval.seeds) == (1.0, 1.0, 2)
    assert not cfg.rollout.parallel  # sampling rollouts are sequential: the text depends on the draft
    cfg = study_opd.Study("configs/tiny.yaml").load()
    assert (cfg.rollout.temperature, cfg.eval.temperature, cfg.eval.seeds) == (0.0, 0.0, 1)
