"""`draft-opd eval` end to end on the tiny target, and the tau/speedup arithmetic by hand."""

import json

import pytest

from draft_opd.evaluation.protocol import TurnResult, run_conversation, summarize
from draft_opd.launch.cli import main
from draft_opd.prompts.chat import render_prompt
from draft_opd.prompts.sets import load_benchmark
from draft_opd.speculative.decode import DecodeConfig, generate
from tests.conftest import make_drafter


def turn(taus, tpot_plain, tpot_spec, lossless=True):
    return TurnResult(
        conversation="c",
        turn=0,
        seed=0,
        prompt_tokens=5,
        new_tokens=sum(taus) or 4,
        lossless=lossless,
        tpot_plain=tpot_plain,
        tpot_spec=tpot_spec,
        taus=taus,
    )


def test_summary_reports_both_tau_conventions_and_the_tpot_ratio():
    s = summarize("x", 2, [turn([3, 1], 0.04, 0.02), turn([5, 5, 5, 1], 0.06, 0.01)])
    assert s.tau_mean == pytest.approx((2.0 + 4.0) / 2)  # mean of per-turn means (DFlash)
    assert s.tau_pooled == pytest.approx(20 / 6)  # total tokens / total steps (SpecForge)
    assert s.speedup == pytest.approx(0.05 / 0.015)  # mean TPOT plain / mean TPOT spec
    assert s.tau_ci95 == pytest.approx(1.96 * 2**0.5 / 2**0.5)  # per-turn taus 2 and 4: sd sqrt(2), n 2
    assert s.lossless is True
    assert summarize("x", 1, [turn([2], 0.1, 0.1), turn([1], 0.1, 0.1, lossless=False)]).lossless is False


def test_plain_only_summary_has_no_tau_or_speedup():
    s = summarize("x", 1, [turn([], 0.05, None)])
    assert s.tau_mean is None and s.speedup is None and s.lossless is None
    assert s.tokens_per_s_plain == pytest.approx(20.0)


def test_mt_bench_later_turns_include_the_targets_own_answers(tiny_target):
    conv = load_benchmark("mt_bench", "tests/fixtures/mt_bench_question.jsonl", num_prompts=1)[0]
    cfg = DecodeConfig(max_new_tokens=12)
    results = run_conversation(tiny_target, make_drafter(tiny_target, "dflash", 4), conv, cfg, thinking=False)
    assert [r.turn for r in results] == [0, 1]
    tok = tiny_target.tokenizer
    first = render_prompt(tok, [{"role": "user", "content": conv.turns[0]}], False)
    answer = tok.decode(generate(tiny_target, first, None, cfg).response, skip_special_tokens=True)
    second = render_prompt(
        tok,
        [
            {"role": "user", "content": conv.turns[0]},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": conv.turns[1]},
        ],
        False,
    )
    assert results[0].prompt_tokens == len(first) and results[1].prompt_tokens == len(second)
    assert all(r.lossless for r in results)


def test_thinking_switch_reaches_the_chat_template(tiny_target):
    messages = [{"role": "user", "content": "hi"}]
    off = tiny_target.tokenizer.decode(render_prompt(tiny_target.tokenizer, messages, thinking=False))
    on = tiny_target.tokenizer.decode(render_prompt(tiny_target.tokenizer, messages, thinking=True))
    assert off.endswith("<think>\n\n</think>\n\n") and not on.endswith("</think>\n\n")


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_eval_command_writes_a_lossless_report(tmp_path, kind, capsys):
    out = tmp_path / "report.json"
    main(
        [
            "eval",
            "configs/tiny.yaml",
            "eval.benchmarks=[gsm8k,humaneval]",
            "eval.num_prompts=2",
            "eval.max_new_tokens=16",
            f"draft.kind={kind}",
            "draft.init=random",
            "draft.num_layers=1",
            f"eval.out={out}",
        ]
    )
    report = json.loads(out.read_text())
    rows = {s["benchmark"]: s for s in report["summaries"]}
    assert set(rows) == {"gsm8k", "humaneval"}
    for row in rows.values():
        assert row["prompts"] == 2 and row["lossless"] is True
        assert row["tau_mean"] >= 1.0 and row["speedup"] > 0
    assert "tau pooled" in capsys.readouterr().out


def test_eval_at_t1_decodes_every_prompt_at_each_sampling_seed(tmp_path, capsys):
    out = tmp_path / "sampled.json"
    args = ["eval", "configs/tiny.yaml", "eval.num_prompts=2", "eval.max_new_tokens=8", "draft.init=random"]
    main([*args, "eval.temperature=1.0", "eval.seeds=3", "eval.warmup_tokens=0", f"eval.out={out}"])
    report = json.loads(out.read_text())
    turns = report["turns"]["gsm8k"]
    assert [t["seed"] for t in turns] == [0, 0, 1, 1, 2, 2]  # every prompt at each seed
    assert len({tuple(t["taus"]) for t in turns if t["conversation"] == turns[0]["conversation"]}) > 1  # seeds differ
    (row,) = report["summaries"]
    assert row["turns"] == 6 and row["tau_ci95"] > 0
    assert "3 seeds" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="eval.seeds=3 with eval.temperature=0"):
        main([*args, "eval.seeds=3"])


def test_eval_without_a_draft_measures_plain_decoding(tmp_path):
    out = tmp_path / "plain.json"
    main(["eval", "configs/tiny.yaml", "eval.num_prompts=1", "eval.max_new_tokens=8", f"eval.out={out}"])
    (row,) = json.loads(out.read_text())["summaries"]
    assert row["tau_mean"] is None and row["lossless"] is None and row["tokens_per_s_plain"] > 0


def test_eval_errors_exit_with_a_message(capsys):
    with pytest.raises(SystemExit, match="did you mean 'eval.num_prompts'"):
        main(["eval", "configs/tiny.yaml", "eval.num_prompt=1"])
    with pytest.raises(SystemExit, match="set data.aime=PATH"):
        main(["eval", "configs/tiny.yaml", "eval.benchmarks=[aime]"])
