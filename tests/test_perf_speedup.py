"""`make bench-speedup` runs end to end on the tiny target and writes every phase it prints (no timing asserted)."""

from __future__ import annotations

import json

import pytest

from draft_opd.perf import speedup


@pytest.mark.slow
def test_bench_speedup_writes_every_phase_for_every_row(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(speedup, "NEW_TOKENS", 24)
    monkeypatch.setattr(speedup, "PROMPTS", 1)
    speedup.main(["tiny"])
    report = json.loads((tmp_path / "runs" / "bench-speedup.json").read_text())
    rows = report["rows"]
    assert [(r["layout"], r["block_size"]) for r in rows] == [
        ("as loaded (F.linear)", 8),
        ("pre-transposed", 2),
        ("pre-transposed", 4),
        ("pre-transposed", 6),
        ("pre-transposed", 8),
    ]
    for r in rows:
        assert r["steps"] > 0 and r["tau"] >= 1
        assert r["step_ms"] >= max(r["draft_ms"], r["verify_ms"], r["bookkeeping_ms"]) > 0
        assert r["speedup_estimate"] == pytest.approx(r["tau"] / r["step_per_plain"])
    assert report["plain_loop_vs_hf"]["ours_tpot_ms"] > 0 and report["plain_loop_vs_hf"]["hf_generate_tpot_ms"] > 0
