"""The one definition of tau, against hand-computed values; evals and rollouts report through it."""

import pytest

from draft_opd.evaluation.protocol import TurnResult, summarize
from draft_opd.speculative.tau import tau_mean, tau_pooled


def test_mean_of_means_and_pooled_differ_as_defined():
    accept_lens = [[0, 2], [3]]  # sequence 1: taus 1, 3 (mean 2); sequence 2: tau 4
    assert tau_mean(accept_lens) == pytest.approx((2 + 4) / 2)
    assert tau_pooled(accept_lens) == pytest.approx((1 + 3 + 4) / 3)


def test_sequences_without_a_verify_step_are_left_out():
    assert tau_mean([[], [1]]) == pytest.approx(2.0)
    assert tau_pooled([[], [1, 3]]) == pytest.approx(3.0)
    assert tau_mean([[]]) is None and tau_pooled([]) is None


def test_the_eval_protocol_reports_both_through_it():
    turns = [
        TurnResult(
            conversation=c,
            turn=0,
            seed=0,
            prompt_tokens=5,
            new_tokens=9,
            lossless=True,
            tpot_plain=0.02,
            tpot_spec=0.01,
            taus=taus,
        )
        for c, taus in (("a", [1, 3]), ("b", [4]))
    ]
    summary = summarize("gsm8k", 2, turns)
    assert summary.tau_mean == pytest.approx(3.0) and summary.tau_pooled == pytest.approx(8 / 3)
