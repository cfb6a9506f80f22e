"""The study scripts' bookkeeping: learning-curve points from a run's metrics lines."""

import pytest

from benchmarks.study_sft_curve import curve


def test_curve_points_count_the_tokens_and_time_trained_before_each_evaluation():
    records = [
        {"step": 0, "phase": "init", "eval_tau": 1.0},
        {"step": 1, "phase": "sft", "trained_tokens": 100, "time": 1000.0},
        {"step": 2, "phase": "sft", "trained_tokens": 999, "time": 1500.0},  # logged before a resume ...
        {"step": 2, "phase": "sft", "trained_tokens": 120, "time": 1720.0},  # ... and again after it: this wins
        {"step": 2, "phase": "eval", "eval_tau": 1.5, "eval_tau_pooled": 1.4},
        {"phase": "fault", "fault": "learner failed", "time": 1750.0},
        {"step": 3, "phase": "sft", "trained_tokens": 80, "time": 4600.0},
        {"step": 3, "phase": "final", "eval_tau": 2.0},
    ]
    points = curve(records)
    assert [p["step"] for p in points] == [0, 2, 3]
    assert [p["trained_tokens"] for p in points] == [0, 220, 300]
    assert [p["train_hours"] for p in points] == pytest.approx([0.0, 0.2, 1.0])
    assert [p["eval_tau"] for p in points] == [1.0, 1.5, 2.0]
    assert points[1]["eval_tau_pooled"] == 1.4
