"""`draft-opd generate` on the tiny target: a corpus of the target's greedy outputs that the SFT learner reads,
resumable after a real SIGKILL, with features equal to a recompute, and one-line errors."""

import io
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from draft_opd.actors.prompts import load_prompts
from draft_opd.actors.requests import Request
from draft_opd.actors.rollout import RolloutConfig, RolloutWorker
from draft_opd.buffer import BufferConfig, ReplayBuffer, SegmentWarning, Trajectory
from draft_opd.launch.config import load_config
from draft_opd.launch.generate import frequent_tokens, generate_corpus
from draft_opd.learner.objective import ObjectiveConfig, phase_loss
from draft_opd.learner.replay import TargetSource
from draft_opd.speculative.decode import DecodeConfig, generate
from tests.conftest import make_drafter
from tests.test_bad_input import LONG, cli_error, write_jsonl

PROMPTS, NEW_TOKENS = 5, 16
SMALL = [f"generate.num_prompts={PROMPTS}", f"generate.max_new_tokens={NEW_TOKENS}"]


def run(out: Path, *overrides: str) -> dict:
    cfg = load_config("configs/tiny.yaml", [f"generate.out={out}", *overrides])
    return generate_corpus(cfg, Console(file=io.StringIO()))


def corpus(out: Path) -> dict[str, Trajectory]:
    buffer = ReplayBuffer(BufferConfig(dir=str(out)))
    assert buffer.stats()["duplicates"] == 0  # no row stored twice across segments
    return {t: buffer.get(t) for t in buffer.traj_ids()}


@pytest.mark.parametrize("batch", [1, 4])
def test_outputs_equal_plain_greedy_generate(tmp_path, tiny_target, batch):
    run(tmp_path / "corpus", *SMALL, f"generate.batch_size={batch}")
    rows = corpus(tmp_path / "corpus")
    requests = [Request.of(tiny_target.tokenizer, 0, c, True) for c in load_prompts("gsm8k_train", PROMPTS)]
    assert sorted(rows) == sorted(r.traj_id for r in requests)
    for request in requests:
        row, alone = (
            rows[request.traj_id],
            generate(tiny_target, request.prompt, None, DecodeConfig(max_new_tokens=NEW_TOKENS)),
        )
        assert row.input_ids == alone.tokens and row.prompt_len == len(request.prompt)
        torch.testing.assert_close(
            torch.tensor(row.committed_logprobs), torch.tensor(alone.committed_logprobs), atol=1e-4, rtol=1e-4
        )
        assert (row.prompt_id, row.draft_version, row.actor_id) == (request.prompt_id, 0, "generate")
        # block size 1: each pass after the prefill verified the last token and committed one, proposing nothing
        assert row.anchors == list(range(len(request.prompt), len(row.input_ids) - 1))
        assert row.draft_tokens == [[]] * len(row.anchors) and set(row.accept_len) == {0} and row.features is None


def test_parallel_rollouts_take_the_corpus_text_where_it_holds_the_prompt(tmp_path):
    run(tmp_path / "corpus", "generate.num_prompts=3", f"generate.max_new_tokens={NEW_TOKENS}")
    cfg = load_config("configs/tiny.yaml", [])
    rollout = RolloutConfig(num_prompts=5, max_new_tokens=NEW_TOKENS, text_corpus=str(tmp_path / "corpus"))
    parallel = RolloutWorker(cfg.target, cfg.draft, rollout)
    sequential = RolloutWorker(
        cfg.target, cfg.draft, RolloutConfig(num_prompts=5, max_new_tokens=NEW_TOKENS, mode="sequential")
    )
    a = {t.traj_id: t for t in parallel.rollouts(5)}
    b = {t.traj_id: t for t in sequential.rollouts(5)}
    assert sorted(parallel.text.known) == [f"gsm8k_train/{i}" for i in range(3)]
    assert sorted(parallel.text.fallback.known) == ["gsm8k_train/3", "gsm8k_train/4"]  # decoded: not in the corpus
    assert {k: (t.input_ids, t.accept_len) for k, t in a.items()} == {
        k: (t.input_ids, t.accept_len) for k, t in b.items()
    }
    longer = RolloutWorker(cfg.target, cfg.draft, replace(rollout, max_new_tokens=NEW_TOKENS + 8))
    assert not longer.text.known  # a corpus text shorter than max_new_tokens (and without a stop) is not used


def test_corpus_reopens_and_an_sft_step_samples_from_it(tmp_path, tiny_target):
    out = tmp_path / "corpus"
    run(out, *SMALL, "generate.batch_size=4")
    assert sorted(p.suffix for p in out.iterdir()) == [".arrow", ".arrow", ".done", ".done"]  # sealed every batch
    buffer = ReplayBuffer(BufferConfig(dir=str(out)))
    batch = buffer.sample(16)
    assert set(batch.traj_ids) <= set(buffer.traj_ids()) and not batch.rejected_mask.any()
    drafter = make_drafter(tiny_target, "dflash", block_size=5)
    before = [p.detach().clone() for p in drafter.parameters()]
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=1e-3)
    out = phase_loss("sft", drafter, batch, TargetSource(tiny_target), ObjectiveConfig(), np.random.default_rng(0))
    out["loss"].backward()
    optimizer.step()
    assert torch.isfinite(out["loss"]) and any(not torch.equal(a, b) for a, b in zip(before, drafter.parameters()))


def test_a_rerun_after_sigkill_completes_the_corpus_as_one_run_would(tmp_path):
    many = ["generate.num_prompts=8", "generate.max_new_tokens=24", "generate.batch_size=2"]
    killed = tmp_path / "killed"
    job = subprocess.Popen(
        [sys.executable, "-m", "draft_opd.launch.generate", "configs/tiny.yaml", f"generate.out={killed}", *many],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(killed.glob("*.done")) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(job.pid, signal.SIGKILL)
    finally:
        job.wait(timeout=30)
    assert job.returncode == -signal.SIGKILL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SegmentWarning)  # the segment open at the kill has no marker
        sealed = len(corpus(killed))
        resumed = run(killed, *many)
        rows = corpus(killed)
    assert 0 < sealed < 8  # killed mid-run, with rows already sealed
    assert resumed["generated"] == 8 - sealed and len(rows) == 8
    run(tmp_path / "one-go", *many)
    assert {t: r.input_ids for t, r in rows.items()} == {t: r.input_ids for t, r in corpus(tmp_path / "one-go").items()}


def test_stored_features_equal_a_recompute(tmp_path, tiny_target):
    run(tmp_path / "corpus", *SMALL, "generate.store_features=true")
    for row in corpus(tmp_path / "corpus").values():
        recomputed = tiny_target.forward(torch.tensor(row.input_ids), 0, None).features
        assert row.features.dtype == np.float16 and row.features.shape == tuple(recomputed.shape)
        torch.testing.assert_close(torch.from_numpy(row.features.astype(np.float32)), recomputed, atol=2e-3, rtol=2e-3)


def test_prompts_too_long_are_skipped_with_a_warning(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", [{"id": "long", "prompt": LONG}, {"id": "short", "prompt": "hi"}])
    with pytest.warns(
        UserWarning,
        match=r"generate: skipped prompt mix/long@0: prompt of \d+ tokens.*exceeds.*"
        "lower generate.max_new_tokens",
    ):
        summary = run(tmp_path / "corpus", f"generate.prompts={path}", "generate.max_new_tokens=8")
    assert summary["trajectories"] == 1 and list(corpus(tmp_path / "corpus")) == ["mix/short@0"]


def rollout_row(out: Path) -> None:
    with ReplayBuffer(BufferConfig(dir=str(out))) as buffer:
        buffer.insert(
            Trajectory("gsm8k_train/0@0", "gsm8k_train/0", 3, "rollout-0", 0.0, [1, 2, 3], 2, [], [], [], [-0.5], [])
        )


@pytest.mark.parametrize(
    "setup, overrides, message",
    [
        (None, ["generate.out=null"], "generate.out is not set: pass generate.out=DIR"),
        ("notes.txt", [], r"generate.out=\S+ holds 'notes.txt', so it is not a corpus: pass a new or empty directory"),
        ("file", [], r"generate.out=\S+ is a file, not a directory"),
        (rollout_row, [], "holds trajectory 'gsm8k_train/0@0' written by 'rollout-0', not by generate"),
        (
            None,
            ["generate.prompts=gsm8k_trian"],
            r"generate.prompts='gsm8k_trian' is neither a benchmark "
            r"\(did you mean 'gsm8k_train'\?\)",
        ),
        (None, ["generate.prompts=missing.jsonl"], "prompt file not found: missing.jsonl"),
        (None, ["generate.batch_size=0"], r"bad config: generate.batch_size must be >= 1 \(got 0\)"),
        (
            None,
            ["generate.prompts=LONG"],
            "none of the 1 prompts of generate.prompts=.*long.jsonl fits the target's "
            "context with generate.max_new_tokens=8; lower generate.max_new_tokens",
        ),
    ],
)
def test_bad_input_is_one_line_naming_the_fix(tmp_path, setup, overrides, message):
    out = tmp_path / "out"
    if setup == "file":
        out.write_text("")
    elif isinstance(setup, str):
        out.mkdir()
        (out / setup).write_text("")
    elif setup is not None:
        setup(out)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": LONG}])
    overrides = [o.replace("LONG", str(long)) for o in overrides]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        error = cli_error(
            "generate", "configs/tiny.yaml", f"generate.out={out}", "generate.max_new_tokens=8", *overrides
        )
    assert error.startswith("draft-opd generate: error: ") and re.search(message, error), error


def test_an_eagle3_draft_vocabulary_is_the_corpus_most_frequent_response_tokens(tmp_path, tiny_target):
    from draft_opd.speculative.drafter import DrafterConfig
    from draft_opd.speculative.loading import build_drafter, load_drafter
    from tests.conftest import TINY_FEATURE_LAYERS, TINY_MASK

    out, n = tmp_path / "corpus", 40
    run(out, *SMALL)
    counts = Counter(t for row in corpus(out).values() for t in row.input_ids[row.prompt_len :])
    ids = frequent_tokens(out, n, tiny_target.vocab_size)
    assert ids.tolist() == sorted(range(tiny_target.vocab_size), key=lambda t: (-counts[t], t))[:n]
    assert len(counts) < n  # the responses hold fewer distinct tokens: the smallest unseen ids fill the rest
    cfg = DrafterConfig(
        kind="eagle3", num_layers=1, target_layer_ids=TINY_FEATURE_LAYERS, mask_token_id=TINY_MASK, draft_vocab_size=n
    )
    drafter = build_drafter(cfg, tiny_target)
    drafter.restrict_vocab(ids)
    vocab = ids.sort().values
    assert torch.equal(drafter.d2t, vocab) and torch.equal(drafter.lm_head.weight, tiny_target.lm_head.weight[vocab])
    logits = drafter.logits(torch.randn(3, drafter.cfg.hidden_size))
    inside = torch.zeros(tiny_target.vocab_size, dtype=torch.bool).index_fill_(0, vocab, True)
    assert torch.isfinite(logits[:, inside]).all() and torch.isneginf(logits[:, ~inside]).all()
    drafter.save(tmp_path / "draft")
    assert torch.equal(load_drafter(tmp_path / "draft", tiny_target).d2t, vocab)
    with pytest.raises(ValueError, match="40 distinct target ids"):
        drafter.restrict_vocab(torch.cat([ids[:-1], ids[:1]]))
