"""The training job end to end on the tiny target through a real local Ray cluster."""

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import ray
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from draft_opd.launch.config import ConfigError, load_config, to_yaml
from draft_opd.launch.run_dir import RunDir
from draft_opd.launch.train import train
from draft_opd.learner.engine import free_port
from draft_opd.speculative.loading import load_drafter
from draft_opd.speculative.target import Target
from draft_opd.speculative.testbeds import tiny_model, tiny_tokenizer

SHORT_RUN = [
    "train.sft_steps=20",
    "train.opd_steps=10",
    "train.publish_every=5",
    "rollout.num_prompts=4",
    "rollout.max_new_tokens=32",
    "learner.batch_size=16",
    "learner.lr=2e-3",
    "learner.warmup_steps=2",
    "train.eval_benchmark=gsm8k_train",
    "train.eval_prompts=4",
    "train.eval_max_new_tokens=32",
    "train.eval_every=12",
    "buffer.min_size_to_sample=3",
    "buffer.timeout_s=120",
    "buffer.samples_per_insert=16",
    "buffer.ratio_tolerance=64",
    "learner.opd_lr=5e-4",  # OPD as make run runs it, at a lower lr on fresh rows: at the SFT lr on rows up to
    "objective.opd_max_staleness=2",  # 5 versions old it undid the SFT gain in 1 run of 3 (tau 1.23 -> 1.09)
]


def scrape_gauges(url: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of one metric on a Prometheus text endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return [
        (s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples if s.name == name
    ]


def test_short_tiny_run_raises_tau_on_its_training_prompts(tmp_path):
    """Also: the tau gauge is live on the cluster's Prometheus endpoint during the run, the run dir
    holds a TensorBoard event file with the same scalars, and a log (not a terminal) gets progress lines."""
    cfg = load_config("configs/tiny.yaml", SHORT_RUN + [f"train.out_dir={tmp_path}"])
    port = free_port()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        _metrics_export_port=port,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    scraped, done = [], threading.Event()

    def scrape() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError):
                scraped.extend(scrape_gauges(f"http://127.0.0.1:{port}/metrics", "ray_draft_opd_tau"))
            time.sleep(1)

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    log = io.StringIO()
    try:
        summary = train(cfg, Console(file=log, width=200))
    finally:
        done.set()
        scraper.join()
        ray.shutdown()
    assert summary["tau_after"] > summary["tau_before"] + 0.1, summary
    lines = log.getvalue().splitlines()
    assert any(line.startswith("step 1/30 [sft] loss") and "ETA" in line for line in lines), lines
    assert any(line.startswith("step 20/30 [sft]") for line in lines) or any(  # phase change -> a line
        line.startswith("step 21/30 [opd] loss") and " tau " in line for line in lines
    ), lines
    assert any(line.startswith("step 30/30 [opd]") and "ETA 0m00s" in line for line in lines), lines
    taus = [value for labels, value in scraped if labels.get("actor") == "rollout-0" and labels.get("run") == "tiny"]
    assert taus and all(value >= 1.0 for value in taus), scraped[:5]
    events = EventAccumulator(str(tmp_path / "tiny" / "tensorboard")).Reload()
    assert {"tau/rollout-0", "loss/loss", "eval_tau/gsm8k_train", "acceptance_rate/1"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss/loss")] == list(range(1, 31))
    run = tmp_path / "tiny"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["phase"] in ("sft", "opd")]
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert {r["phase"] for r in steps} == {"sft", "opd"}
    assert all({"loss", "tau", "draft_version"} <= set(r) for r in steps)
    assert steps[5]["draft_version"] == 1 and "publish_s" in steps[4]  # published after step 5
    assert "publish_s" in steps[11] and "publish_s" in steps[23]  # an evaluation measures the latest weights
    # the rollout actor itself reports holding the last published version (6 periodic, 2 for evals, 1 final)
    assert records[-1]["phase"] == "final" and records[-1]["draft_version"] == 9
    evals = [r["step"] for r in records if "eval_tau" in r]
    assert evals == [0, 12, 24, 30], evals  # before, periodic, final (none periodic at the last step)
    draft = load_drafter(run / "draft", Target(tiny_model(), tiny_tokenizer(), [0, 1, 2]))
    assert draft.cfg.kind == "dflash"


@pytest.mark.slow
def test_ray_job_submit_runs_the_training_job(tmp_path):
    """`ray start --head` + `ray job submit --working-dir . -- python -m draft_opd.launch.train ...`,
    as on a cluster."""
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"  # Ray 2.60's dashboard API wants the token of ~/.ray/auth_token
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"  # job drivers run the cluster's `python`
    dashboard = "http://127.0.0.1:8265"
    subprocess.run(
        [bin_dir / "ray", "start", "--head", "--num-cpus=4", "--dashboard-host=127.0.0.1"],
        check=True,
        env=env,
        capture_output=True,
    )
    try:
        out_dir = tmp_path / "runs"
        submit = [
            bin_dir / "ray",
            "job",
            "submit",
            "--address",
            dashboard,
            "--working-dir",
            ".",
            "--",
            "python",
            "-m",
            "draft_opd.launch.train",
            "configs/tiny.yaml",
            *SHORT_RUN,
            f"train.out_dir={out_dir}",
        ]
        for _ in range(60):  # the job server and its agent come up some seconds after `ray start` returns
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
            if not any(s in job.stderr for s in ("No available agent", "Failed to connect", "Connection refused")):
                break
            time.sleep(2)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout.lower()
        summary = json.loads((out_dir / "tiny" / "summary.json").read_text())
        assert summary["tau_after"] > summary["tau_before"]
        assert (out_dir / "tiny" / "metrics.jsonl").read_text().count("\n") >= 30
    finally:
        subprocess.run([bin_dir / "ray", "stop", "--force"], env=env, capture_output=True)


def run_job(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "draft_opd.launch.train", "configs/tiny.yaml", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_a_finished_run_answers_at_once_without_starting_ray(tmp_path, capsys):
    run = tmp_path / "tiny"
    run.mkdir()
    summary = {
        "tau_before": 1.0,
        "tau_after": 1.5,
        "steps": 30,
        "draft": str(run / "draft"),
        "wall_s": 60.0,
        "learner_restarts": 0,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    cfg = load_config("configs/tiny.yaml", SHORT_RUN + [f"train.out_dir={tmp_path}", "resume=auto"])
    assert train(cfg) == summary
    assert not ray.is_initialized()
    said = " ".join(capsys.readouterr().err.split())
    assert "is a finished run (held-out tau 1.000 -> 1.500" in said and "name=NEW_NAME" in said, said


def test_resume_refuses_a_run_with_other_settings(tmp_path):
    """A run directory written with another drafter (or by a version whose schema differs) is refused, naming
    the keys that differ, before any process starts."""
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.yaml").write_text(
        to_yaml(load_config("configs/tiny.yaml", ["draft.block_size=4", f"train.out_dir={tmp_path}"]))
    )
    cfg = load_config("configs/tiny.yaml", [f"train.out_dir={tmp_path}", "resume=auto", "train.eval_every=7"])
    with pytest.raises(ValueError, match=r"other settings \(draft.block_size: 4 -> 8\); resume it") as err:
        train(cfg)
    assert "eval_every" not in str(err.value)  # run-independent settings may change on resume
    (tmp_path / "tiny" / "config.yaml").write_text("name: tiny\nlearner:\n  gone_key: 1\n")
    with pytest.raises(ValueError, match="holds a run this version cannot resume.*gone_key.*name=NEW_NAME"):
        train(cfg)
    assert not ray.is_initialized()


def test_a_stage_past_its_deadline_stops_the_job_naming_it(tmp_path):
    """No wait of the driver is unbounded: with a deadline shorter than start-up, the job exits 1 with one
    line naming what it waited for and the setting that bounds it."""
    job = run_job(*SHORT_RUN, f"train.out_dir={tmp_path}", "train.stage_timeout_s=0.5")
    assert job.returncode == 1, job.stderr[-2000:]
    [said] = [line for line in job.stderr.splitlines() if line.startswith("draft-opd train: error: ")]  # Ray's own
    assert "not done after train.stage_timeout_s=0.5 s" in said, said  # shutdown lines may follow it


def test_offline_sft_on_a_corpus_then_online_opd(tmp_path):
    """train.sft_corpus: the SFT phase samples a corpus of target text while no rollout runs (the rollout buffer
    stays empty), then OPD starts the rollouts; held-out tau rises."""
    from draft_opd.actors.rollout import RolloutConfig, RolloutWorker
    from draft_opd.buffer import BufferConfig, ReplayBuffer

    base = load_config("configs/tiny.yaml", SHORT_RUN)
    with ReplayBuffer(BufferConfig(dir=str(tmp_path / "corpus"))) as corpus:  # T=0: the target's own text
        RolloutWorker(base.target, base.draft, RolloutConfig(num_prompts=4, max_new_tokens=32), 0, corpus).run(4)
    cfg = load_config(
        "configs/tiny.yaml", SHORT_RUN + [f"train.out_dir={tmp_path}", f"train.sft_corpus={tmp_path / 'corpus'}"]
    )
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        summary = train(cfg, Console(file=io.StringIO()))
    finally:
        ray.shutdown()
    steps = [r for r in RunDir(tmp_path / "tiny").records() if r["phase"] in ("sft", "opd")]
    sft, opd = [r for r in steps if r["phase"] == "sft"], [r for r in steps if r["phase"] == "opd"]
    assert len(sft) == 20 and len(opd) == 10
    assert all(r["buffer_size"] == 0 and r["rollout_tokens_per_s"] == 0 for r in sft)  # no rollout ran
    assert opd[-1]["buffer_size"] > 0
    assert summary["tau_after"] > summary["tau_before"], summary


def test_a_missing_corpus_is_refused_at_load(tmp_path):
    with pytest.raises(ConfigError, match=r"train.sft_corpus=.*no corpus there; write one with `draft-opd generate"):
        load_config("configs/tiny.yaml", [f"train.sft_corpus={tmp_path}"])


def test_waiting_on_the_learners_returns_the_moment_they_finish_and_never_spins():
    """The driver's wait blocks in ray.wait: a sleep between polls rounded every learner step up to the
    poll interval (0.85 s steps took 1.2 s), and a loop without a blocking wait burnt a core."""
    from draft_opd.launch.progress import wait_all

    @ray.remote
    def learner_step():
        time.sleep(0.5)
        return 7

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        calls = []
        start = time.perf_counter()
        assert wait_all([learner_step.remote()], "a step", 120, "key", lambda: calls.append(1), poll_s=60) == [7]
        assert time.perf_counter() - start < 60 and calls == []  # back before its first poll ended
        calls.clear()
        assert wait_all([learner_step.remote()], "a step", 120, "key", lambda: calls.append(1), poll_s=0.05) == [7]
        assert 1 <= len(calls) <= 1000  # polled while waiting, not a busy loop (tens of thousands)
    finally:
        ray.shutdown()
