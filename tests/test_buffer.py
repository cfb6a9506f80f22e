"""Replay buffer: schema round trip, idempotency, persistence and corruption, rate limiting,
sampled positions, staleness, eviction, Ray. Real pyarrow files in tmp_path, real local Ray."""

import json
import os
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from draft_opd.buffer import (
    SCHEMA,
    BufferConfig,
    RateLimitTimeout,
    ReplayBuffer,
    ReplayBufferActor,
    SegmentWarning,
    Trajectory,
)

REJECTED_TOKEN = 900  # hand-built rejected proposals are 900+, committed tokens stay below


def make_traj(
    traj_id: str,
    accept_lens: list[int],
    n_drafts: list[int] | None = None,
    prompt_len: int = 4,
    version: int = 0,
    topk: int = 0,
    feature_dim: int = 0,
) -> Trajectory:
    """A trajectory whose every number is traceable: committed tokens count up from 100, rejected
    proposals are 900+, log-probs encode (step, offset) or position."""
    n_drafts = n_drafts or [5] * len(accept_lens)
    ids = list(range(10, 10 + prompt_len))
    anchors, drafts, draft_lp = [], [], []
    for step, (accept, n) in enumerate(zip(accept_lens, n_drafts)):
        anchors.append(len(ids) - 1)
        committed = [100 + len(ids) + k for k in range(accept + 1)]  # accepted proposals + bonus
        drafts.append(committed[:accept] + [REJECTED_TOKEN + 10 * step + j for j in range(accept, n)])
        draft_lp.append([-(step + j / 100) for j in range(n)])
        ids += committed
    n_resp = len(ids) - prompt_len
    rng = np.random.default_rng(len(ids))
    topk_ids = topk_lp = features = None
    if topk:
        topk_ids = [rng.integers(0, 1000, (n, topk)).astype(np.int32) for n in n_drafts]
        topk_lp = [-rng.random((n, topk)).astype(np.float32) for n in n_drafts]
    if feature_dim:
        features = rng.standard_normal((len(ids), feature_dim)).astype(np.float16)
    return Trajectory(
        traj_id=traj_id,
        prompt_id=f"p-{traj_id}",
        draft_version=version,
        actor_id="actor-0",
        created_at=1_700_000_000.25,
        input_ids=ids,
        prompt_len=prompt_len,
        anchors=anchors,
        draft_tokens=drafts,
        accept_len=list(accept_lens),
        committed_logprobs=[-p / 8 for p in range(n_resp)],
        draft_logprobs=draft_lp,
        topk_ids=topk_ids,
        topk_logprobs=topk_lp,
        features=features,
    )


def assert_same(a: Trajectory, b: Trajectory) -> None:
    for name in (
        "traj_id",
        "prompt_id",
        "draft_version",
        "actor_id",
        "created_at",
        "input_ids",
        "prompt_len",
        "anchors",
        "draft_tokens",
        "accept_len",
    ):
        assert _py(getattr(a, name)) == _py(getattr(b, name)), name
    for name in ("committed_logprobs", "draft_logprobs", "topk_ids", "topk_logprobs"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert len(x) == len(y), name
            for u, v in zip(x, y):
                np.testing.assert_array_equal(np.asarray(u, np.float32), np.asarray(v, np.float32), err_msg=name)
    assert (a.features is None) == (b.features is None)
    if a.features is not None:
        assert a.features.dtype == b.features.dtype == np.float16
        np.testing.assert_array_equal(a.features, b.features)


def _py(value):
    return [_py(v) for v in value] if isinstance(value, (list, np.ndarray)) else value


def segment_rows_on_disk(directory) -> int:
    return sum(json.loads(p.read_text())["rows"] for p in directory.glob("seg-*.done"))


# --- schema, idempotency, persistence -------------------------------------------------------


def test_round_trip_is_lossless_in_memory_and_on_disk(tmp_path):
    traj = make_traj("t0", [0, 3, 5, 1], [5, 5, 5, 2], topk=3, feature_dim=6)
    assert_same(Trajectory.from_record_batch(traj.to_record_batch()), traj)
    config = BufferConfig(dir=str(tmp_path), topk=3)
    with ReplayBuffer(config) as buf:
        assert buf.insert(traj) == 1
        assert_same(buf.get("t0"), traj)
    assert_same(ReplayBuffer(config).get("t0"), traj)


def test_same_traj_id_is_stored_once_also_across_reopen(tmp_path):
    config = BufferConfig(dir=str(tmp_path), segment_rows=2)
    buf = ReplayBuffer(config)
    assert buf.insert(make_traj("a", [1, 2])) == 1
    assert buf.insert(make_traj("a", [1, 2])) == 0
    twice_in_one_batch = pa.concat_batches([make_traj("b", [0]).to_record_batch()] * 2)
    assert buf.insert(twice_in_one_batch) == 1
    assert len(buf) == 2 and buf.stats()["duplicates"] == 2
    buf.close()

    reopened = ReplayBuffer(config)
    assert reopened.insert(make_traj("a", [1, 2])) == 0
    assert reopened.insert(make_traj("c", [1])) == 1
    reopened.close()
    assert len(ReplayBuffer(config)) == 3
    assert segment_rows_on_disk(tmp_path) == 3


@pytest.mark.filterwarnings("error::buffer.SegmentWarning")
def test_reopened_buffer_holds_the_same_rows_in_order(tmp_path):
    config = BufferConfig(dir=str(tmp_path), segment_rows=3)
    originals = [make_traj(f"t{i}", [i % 4, 2], version=i) for i in range(10)]
    with ReplayBuffer(config) as buf:
        for traj in originals:
            buf.insert(traj)
    assert len(list(tmp_path.glob("seg-*.done"))) == 4  # 3 + 3 + 3 rolled, 1 sealed by close

    reopened = ReplayBuffer(config)
    assert reopened.stats()["loaded"] == 10 and len(reopened) == 10
    for traj in originals:
        assert_same(reopened.get(traj.traj_id), traj)
    small = ReplayBuffer(BufferConfig(dir=str(tmp_path), segment_rows=3, capacity=4))
    assert [t for t in (f"t{i}" for i in range(10)) if t in small] == ["t6", "t7", "t8", "t9"]


def _three_sealed_segments(tmp_path) -> BufferConfig:
    config = BufferConfig(dir=str(tmp_path), segment_rows=2)
    with ReplayBuffer(config) as buf:
        for i in range(6):
            buf.insert(make_traj(f"t{i}", [2, 0, 4]))
    return config


def _truncate(path):
    os.truncate(path, path.stat().st_size // 2)


def _flip_bytes(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))


def _drop_marker(path):
    path.with_suffix(".done").unlink()


def _garble_marker(path):
    path.with_suffix(".done").write_text("{not json")


@pytest.mark.parametrize(
    "damage, message",
    [
        (_truncate, "truncated"),
        (_flip_bytes, "corrupt"),
        (_drop_marker, "no completion marker"),
        (_garble_marker, "unreadable"),
    ],
)
def test_damaged_segment_is_skipped_with_a_warning_and_the_rest_loads(tmp_path, damage, message):
    config = _three_sealed_segments(tmp_path)
    damage(tmp_path / "seg-000001.arrow")
    with pytest.warns(SegmentWarning, match=rf"seg-000001\.(arrow|done).*{message}.*Fix: delete"):
        buf = ReplayBuffer(config)
    assert sorted(t for t in (f"t{i}" for i in range(6)) if t in buf) == ["t0", "t1", "t4", "t5"]
    assert buf.stats()["skipped_segments"] == 1
    assert buf.insert(make_traj("t6", [1])) == 1  # new rows go to a fresh segment, not over the damaged one
    buf.close()
    assert (tmp_path / "seg-000003.done").exists()


def test_crash_before_sealing_loses_only_the_open_segment(tmp_path):
    config = BufferConfig(dir=str(tmp_path), segment_rows=2)
    crashed = ReplayBuffer(config)
    for i in range(3):
        crashed.insert(make_traj(f"t{i}", [1, 1]))  # t0, t1 sealed; t2 in the open segment, never sealed
    with pytest.warns(SegmentWarning, match="seg-000001.arrow.*no completion marker"):
        buf = ReplayBuffer(config)
    assert "t0" in buf and "t1" in buf and "t2" not in buf


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, change",
    [
        ("committed_logprobs", lambda t: t.committed_logprobs.pop()),
        ("draft_logprobs", lambda t: t.draft_logprobs[1].pop()),
        ("accept_len", lambda t: t.accept_len.append(0)),
        ("accept_len", lambda t: t.accept_len.__setitem__(0, 6)),
        ("draft_tokens", lambda t: t.draft_tokens[1].__setitem__(0, 7)),  # an "accepted" token that was not committed
        (
            "draft_tokens",
            lambda t: t.draft_tokens[0].__setitem__(2, t.input_ids[t.anchors[0] + 3]),
        ),  # rejected == bonus
        ("anchors", lambda t: t.anchors.__setitem__(0, 0)),
        ("anchors", lambda t: t.anchors.__setitem__(1, 2**31 - 1)),  # int32 anchor + accept_len must not wrap around
        ("prompt_len", lambda t: setattr(t, "prompt_len", 0)),
        ("input_ids", lambda t: t.input_ids.__setitem__(0, 1.5)),
        ("features", lambda t: setattr(t, "features", np.zeros((3, 2), np.float32))),
        ("features", lambda t: setattr(t, "features", np.zeros((3, 2), np.float16))),
    ],
)
def test_bad_trajectory_raises_value_error_naming_the_field(field, change):
    traj = make_traj("bad", [2, 1, 5])
    change(traj)
    with pytest.raises(ValueError, match=f"'{field}'"):
        traj.to_record_batch()


def test_insert_checks_schema_and_topk_against_config():
    buf = ReplayBuffer(BufferConfig(topk=4))
    with pytest.raises(ValueError, match="topk"):
        buf.insert(make_traj("k3", [1], topk=3))
    with pytest.raises(ValueError, match="topk"):
        buf.insert(make_traj("none", [1]))
    int64_ids = SCHEMA.set(SCHEMA.get_field_index("input_ids"), pa.field("input_ids", pa.list_(pa.int64())))
    wrong_type = make_traj("x", [1]).to_record_batch().cast(int64_ids)
    with pytest.raises(ValueError, match="'input_ids' should be list<item: int32>"):
        buf.insert(wrong_type)
    assert len(buf) == 0


# --- batched insert -------------------------------------------------------------------------


def test_batch_insert_round_trips_and_is_idempotent_within_and_across_batches(tmp_path):
    config = BufferConfig(dir=str(tmp_path), segment_rows=4, topk=2)
    trajs = {
        f"b{i}": make_traj(f"b{i}", [i % 3, 1, 4], [5, 3, 6], version=i, topk=2, feature_dim=3 * (i % 2))
        for i in range(6)
    }
    with ReplayBuffer(config) as buf:
        # insert_many: a list of Trajectory and RecordBatch items, "b1" twice inside the call
        assert buf.insert_many([trajs["b0"], trajs["b1"].to_record_batch(), trajs["b1"], trajs["b2"]]) == 3
        # insert of one multi-row batch: b2 stored before, b3 twice inside it
        batch = pa.concat_batches([trajs[t].to_record_batch() for t in ("b2", "b3", "b3", "b4", "b5")])
        assert buf.insert(batch) == 3
        assert buf.insert(batch) == 0 and buf.insert_many([trajs["b0"], trajs["b5"]]) == 0
        assert len(buf) == 6 and buf.stats()["duplicates"] == 1 + 2 + 5 + 2 and buf.stats()["inserted"] == 6
        for traj_id, traj in trajs.items():
            assert_same(buf.get(traj_id), traj)
        sample = buf.sample(300)
        assert set(sample.traj_ids) == set(trajs)
        for i in range(len(sample)):  # the index built from multi-row batches points at the right rows
            item = sample.item(i)
            traj = trajs[item.traj_id]
            assert item.anchor == traj.anchors[item.step] and item.draft_tokens.tolist() == traj.draft_tokens[item.step]
            np.testing.assert_array_equal(item.topk_ids, traj.topk_ids[item.step])
            assert item.input_ids.tolist() == traj.input_ids
    assert segment_rows_on_disk(tmp_path) == 6
    reopened = ReplayBuffer(config)
    for traj_id, traj in trajs.items():
        assert_same(reopened.get(traj_id), traj)
    assert reopened.insert(batch) == 0
    assert ReplayBuffer(BufferConfig()).insert_many([]) == 0


def test_batch_with_one_invalid_row_is_rejected_whole(tmp_path):
    buf = ReplayBuffer(BufferConfig(dir=str(tmp_path)))
    bad = make_traj("bad", [2, 1, 5])
    bad.draft_tokens[1][0] = 7  # an "accepted" proposal that was never committed
    good = [make_traj(f"g{i}", [1, 2, 3]) for i in range(3)]
    items = [good[0], good[1], bad, good[2]]
    with pytest.raises(ValueError, match=r"trajectory 'bad' \(row 2\), step 1: field 'draft_tokens'"):
        buf.insert_many(items)
    batch = pa.concat_batches([t.unvalidated_record_batch() for t in items])
    with pytest.raises(ValueError, match=r"trajectory 'bad' \(row 2\)"):
        buf.insert(batch)
    assert len(buf) == 0 and buf.stats()["inserted"] == 0 and "g0" not in buf
    buf.close()
    assert segment_rows_on_disk(tmp_path) == 0
    assert buf.insert_many(good) == 3  # the valid rows alone go in


def test_batch_insert_is_split_by_the_rate_limiter_and_resumes():
    # offset 4, window 8: two inserts fit, then each sample of 4 items makes room for one more.
    buf = ReplayBuffer(BufferConfig(samples_per_insert=4, ratio_tolerance=4))
    batch = [make_traj(f"t{i}", [1]) for i in range(4)]
    with pytest.raises(RateLimitTimeout, match=r"'t2' \(row 2 of a 4-row batch; 2 new rows before it were stored\)"):
        buf.insert_many(batch, timeout_s=0.3)
    assert [f"t{i}" in buf for i in range(4)] == [True, True, False, False]  # the rows that fit stay stored
    thread, result = _run_in_thread(lambda: buf.insert_many(batch, timeout_s=10))  # the retry stores the rest
    time.sleep(0.3)
    assert thread.is_alive() and "t2" not in buf
    buf.sample(4)
    time.sleep(0.3)
    assert thread.is_alive() and "t2" in buf and "t3" not in buf
    buf.sample(4)
    thread.join(5)
    assert result["value"] == 2 and len(buf) == 4 and buf.stats()["duplicates"] == 2


def test_batch_larger_than_capacity_keeps_its_newest_rows(tmp_path):
    config = BufferConfig(capacity=3, dir=str(tmp_path), segment_rows=2)
    with ReplayBuffer(config) as buf:
        assert buf.insert_many([make_traj(f"t{i}", [1, 2]) for i in range(5)]) == 5
        assert [f"t{i}" in buf for i in range(5)] == [False, False, True, True, True]
        assert buf.stats()["evicted"] == 2 and buf.insert(make_traj("t0", [1, 2])) == 0
    assert [f"t{i}" in ReplayBuffer(config) for i in range(5)] == [False, False, True, True, True]


# --- rate limiter ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, culprit",
    [
        (dict(capacity=5, min_size_to_sample=6), "min_size_to_sample"),
        (dict(samples_per_insert=8, ratio_tolerance=4), "ratio_tolerance"),
        (dict(samples_per_insert=-1), "samples_per_insert"),
        (dict(sample_policy="greedy"), "sample_policy"),
        (dict(segment_rows=0), "segment_rows"),
    ],
)
def test_configuration_that_could_deadlock_or_is_invalid_is_rejected(settings, culprit):
    with pytest.raises(ValueError, match=culprit):
        ReplayBuffer(BufferConfig(**settings))


def test_sample_larger_than_the_ratio_window_is_rejected():
    buf = ReplayBuffer(BufferConfig(samples_per_insert=4, ratio_tolerance=4))
    buf.insert(make_traj("a", [1]))
    with pytest.raises(ValueError, match="batch_size=5"):
        buf.sample(5)


def test_sample_waits_for_min_size_then_times_out():
    buf = ReplayBuffer(BufferConfig(min_size_to_sample=2))
    buf.insert(make_traj("a", [1]))
    start = time.monotonic()
    with pytest.raises(RateLimitTimeout, match="min_size_to_sample=2") as info:
        buf.sample(1, timeout_s=0.3)
    assert 0.3 <= time.monotonic() - start < 1.5
    assert isinstance(info.value, TimeoutError)


def test_insert_waits_for_the_learner_then_times_out():
    # offset = 4 * 1; inserts may push inserted*4 - sampled up to offset + 4 = 8: two inserts.
    buf = ReplayBuffer(BufferConfig(samples_per_insert=4, ratio_tolerance=4))
    assert buf.insert(make_traj("a", [1])) == 1 and buf.insert(make_traj("b", [1])) == 1
    start = time.monotonic()
    with pytest.raises(RateLimitTimeout, match="learner is behind"):
        buf.insert(make_traj("c", [1]), timeout_s=0.3)
    assert 0.3 <= time.monotonic() - start < 1.5
    assert "c" not in buf and buf.insert(make_traj("a", [1]), timeout_s=0.01) == 0  # duplicates never wait


def _run_in_thread(fn) -> tuple[threading.Thread, dict]:
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()), daemon=True)
    thread.start()
    return thread, result


def _insert_blocked_by_the_ratio() -> tuple[ReplayBuffer, threading.Thread, dict]:
    """A buffer whose third insert ("c") waits for the learner to sample."""
    buf = ReplayBuffer(BufferConfig(samples_per_insert=4, ratio_tolerance=4))
    buf.insert(make_traj("a", [1]))
    buf.insert(make_traj("b", [1]))
    thread, result = _run_in_thread(lambda: buf.insert(make_traj("c", [1]), timeout_s=10))
    time.sleep(0.3)
    assert thread.is_alive() and "c" not in buf
    return buf, thread, result


def test_blocked_insert_resumes_when_the_learner_samples():
    buf, thread, result = _insert_blocked_by_the_ratio()
    buf.sample(4)
    thread.join(5)
    assert result["value"] == 1 and "c" in buf


def test_released_inserts_no_longer_wait_for_the_learner():
    buf, thread, result = _insert_blocked_by_the_ratio()
    buf.release_inserts()
    thread.join(5)
    assert result["value"] == 1 and buf.insert(make_traj("d", [1]), timeout_s=0.1) == 1


def test_blocked_sample_resumes_when_an_actor_inserts():
    buf = ReplayBuffer(BufferConfig(min_size_to_sample=2))
    buf.insert(make_traj("a", [1]))
    thread, result = _run_in_thread(lambda: buf.sample(3, timeout_s=10))
    time.sleep(0.3)
    assert thread.is_alive()
    buf.insert(make_traj("b", [1]))
    thread.join(5)
    assert len(result["value"]) == 3 and buf.stats()["sampled"] == 3


def test_ratio_does_not_hold_inserts_back_while_everything_is_stale():
    buf = ReplayBuffer(BufferConfig(samples_per_insert=4, ratio_tolerance=4, max_staleness=1))
    buf.insert(make_traj("old1", [1], version=0))
    buf.insert(make_traj("old2", [1], version=0))
    sampler, result = _run_in_thread(lambda: buf.sample(2, learner_version=5, timeout_s=10))
    time.sleep(0.2)
    assert sampler.is_alive()  # nothing fresh enough
    assert buf.insert(make_traj("fresh", [1], version=5), timeout_s=2) == 1  # the ratio alone would block this
    sampler.join(5)
    assert result["value"].traj_ids == ["fresh"]


# --- sampling -------------------------------------------------------------------------------


def test_documented_convention_on_a_literal_trajectory():
    # prompt [10, 11]; step 0 proposes 20 21 22 from anchor 1, accepts 1, target's bonus is 30;
    # step 1 proposes 40 41 42 from anchor 3 and accepts all three, bonus 50 falls outside the block.
    traj = Trajectory(
        "lit",
        "p",
        0,
        "a",
        0.0,
        input_ids=[10, 11, 20, 30, 40, 41, 42, 50],
        prompt_len=2,
        anchors=[1, 3],
        draft_tokens=[[20, 21, 22], [40, 41, 42]],
        accept_len=[1, 3],
        committed_logprobs=[-0.1, -0.2, -0.3, -0.4, -0.5, -0.6],
        draft_logprobs=[[-0.1, -5, -6], [-0.3, -0.4, -0.5]],
    )
    buf = ReplayBuffer()
    buf.insert(traj)
    items = {item.step: item for item in (buf.sample(64).item(i) for i in range(64))}
    first, second = items[0], items[1]
    assert (first.anchor, first.accept_len) == (1, 1)
    assert first.accepted_positions.tolist() == [2] and first.accepted_tokens.tolist() == [20]
    assert first.rejected_positions.tolist() == [3, 4] and first.rejected_tokens.tolist() == [21, 22]
    assert first.rejected_logprobs.tolist() == [-5, -6]
    assert (first.bonus_position, first.bonus_token) == (3, 30)
    assert first.bonus_logprob == pytest.approx(-0.2)
    assert second.accepted_positions.tolist() == [4, 5, 6] and second.rejected_positions.tolist() == []
    assert second.bonus_position is None


def test_every_sampled_item_matches_the_recorded_accepts_and_rejections():
    spec = {"x": ([0, 3, 5, 2], [5, 5, 5, 3]), "y": ([1, 1], [7, 7]), "z": ([4], [4])}
    recorded = {tid: make_traj(tid, acc, nd, topk=2) for tid, (acc, nd) in spec.items()}
    buf = ReplayBuffer(BufferConfig(topk=2, seed=1))
    for traj in recorded.values():
        buf.insert(traj)
    batch = buf.sample(400)
    seen = set()
    for i in range(len(batch)):
        item = batch.item(i)
        traj, s = recorded[item.traj_id], item.step
        accept, drafts = traj.accept_len[s], traj.draft_tokens[s]
        anchor = traj.anchors[s]
        offsets = np.arange(len(drafts))
        assert item.anchor == anchor and item.accept_len == accept
        assert item.draft_tokens.tolist() == drafts
        assert item.accepted_positions.tolist() == (anchor + 1 + offsets[:accept]).tolist()
        assert item.accepted_tokens.tolist() == drafts[:accept]
        assert item.accepted_logprobs.tolist() == pytest.approx(
            [traj.committed_logprobs[p - traj.prompt_len] for p in item.accepted_positions]
        )
        assert item.rejected_positions.tolist() == (anchor + 1 + offsets[accept:]).tolist()
        assert item.rejected_tokens.tolist() == drafts[accept:]
        assert all(t >= REJECTED_TOKEN for t in item.rejected_tokens)
        assert item.rejected_logprobs.tolist() == pytest.approx(traj.draft_logprobs[s][accept:])
        if accept < len(drafts):
            assert item.bonus_token == traj.input_ids[anchor + 1 + accept] == item.input_ids[item.bonus_position]
        else:
            assert item.bonus_position is None
        np.testing.assert_array_equal(item.topk_ids, traj.topk_ids[s])
        assert item.input_ids.tolist() == traj.input_ids
        seen.add((item.traj_id, s))
    assert seen == {(tid, s) for tid, (acc, _) in spec.items() for s in range(len(acc))}
    # the padded arrays agree with the masks: pads are zero, masks partition the block
    assert not (batch.accepted_mask & batch.rejected_mask).any()
    assert (batch.draft_tokens[~(batch.accepted_mask | batch.rejected_mask)] == 0).all()
    assert (batch.committed_tokens[batch.accepted_mask] == batch.draft_tokens[batch.accepted_mask]).all()


@pytest.mark.parametrize("blocks_per_row", [1, 8])
@pytest.mark.parametrize("policy", ["uniform", "rejection"])
def test_policy_frequencies(policy, blocks_per_row):
    """Drawing several blocks per row leaves each block's distribution as it was."""
    # steps reject 5, 0, 3 proposals; trajectory "long" has twice the anchors of "short".
    buf = ReplayBuffer(BufferConfig(sample_policy=policy, seed=3))
    buf.insert(make_traj("short", [0, 5, 2]))
    buf.insert(make_traj("long", [0, 5, 2, 0, 5, 2]))
    n, tolerance = 30_000, 0.015 * np.sqrt(blocks_per_row)  # rows drawn: n / blocks_per_row
    batch = buf.sample(n, blocks_per_row=blocks_per_row)
    rejected = batch.n_draft - batch.accept_len
    weights = {5: 1, 0: 1, 3: 1} if policy == "uniform" else {5: 6, 0: 1, 3: 4}
    for r, w in weights.items():  # each rejection count occurs at 3 of the 9 steps
        assert np.mean(rejected == r) == pytest.approx(w / sum(weights.values()), abs=0.015)
    long_share = np.mean(np.array(batch.traj_ids)[batch.traj_index] == "long")
    assert long_share == pytest.approx(2 / 3, abs=tolerance)


def test_blocks_per_row_draws_the_rows_then_that_many_steps_in_each():
    buf = ReplayBuffer(BufferConfig(seed=5))
    for i in range(6):
        buf.insert(make_traj(f"t{i}", [i % 3, 4, 1, 0, 2]))
    batch = buf.sample(18, blocks_per_row=4)
    assert len(batch) == 18 and buf.stats()["sampled"] == 18  # the rate limiter counts blocks, as before
    runs = [batch.traj_index[i : i + 4] for i in range(0, 18, 4)]  # 4, 4, 4, 4 and the last row's 2
    assert [len(r) for r in runs] == [4, 4, 4, 4, 2] and all(len(set(r.tolist())) == 1 for r in runs)
    assert len(set(batch.step.tolist())) > 1  # steps are drawn inside each row, not one step repeated
    with pytest.raises(ValueError, match="blocks_per_row must be >= 1"):
        buf.sample(4, blocks_per_row=0)


def test_sampling_is_reproducible_and_restored_by_state_dict():
    def filled() -> ReplayBuffer:
        buf = ReplayBuffer(BufferConfig(seed=7))
        for i in range(5):
            buf.insert(make_traj(f"t{i}", [i % 3, 4, 1]))
        return buf

    a, b = filled(), filled()
    assert a.sample(50).anchor.tolist() == b.sample(50).anchor.tolist()
    state = a.state_dict()
    expected = a.sample(50)
    c = filled()
    c.load_state_dict(state)
    assert c.sample(50).anchor.tolist() == expected.anchor.tolist()
    assert c.stats()["sampled"] == 100 and c.stats()["inserted"] == 5


def test_staleness_bound_skips_old_draft_versions():
    buf = ReplayBuffer(BufferConfig(max_staleness=2))
    for version in range(6):
        buf.insert(make_traj(f"v{version}", [1, 2], version=version))
    batch = buf.sample(500, learner_version=5)
    assert set(batch.draft_version[batch.traj_index].tolist()) == {3, 4, 5}
    with pytest.raises(RateLimitTimeout, match="max_staleness"):
        buf.sample(1, learner_version=50, timeout_s=0.2)
    with pytest.raises(ValueError, match="learner_version"):
        buf.sample(1)


def test_a_call_can_set_its_own_staleness_bound():
    buf = ReplayBuffer(BufferConfig())  # no bound configured
    for version in range(6):
        buf.insert(make_traj(f"v{version}", [1, 2], version=version))
    assert set(buf.sample(500).draft_version.tolist()) == set(range(6))
    batch = buf.sample(500, learner_version=5, max_staleness=1)
    assert set(batch.draft_version[batch.traj_index].tolist()) == {4, 5}


def test_capacity_evicts_the_oldest_and_their_segments(tmp_path):
    config = BufferConfig(capacity=3, dir=str(tmp_path), segment_rows=2)
    with ReplayBuffer(config) as buf:
        for i in range(7):
            buf.insert(make_traj(f"t{i}", [1, 3]))
        assert [f"t{i}" in buf for i in range(7)] == [False] * 4 + [True] * 3
        assert buf.get("t0") is None and buf.stats()["evicted"] == 4
        assert set(buf.sample(200).traj_ids) == {"t4", "t5", "t6"}
        assert buf.insert(make_traj("t0", [1, 3])) == 0  # evicted ids stay known: a late retry is still a duplicate
    assert sorted(p.name for p in tmp_path.glob("seg-*.done")) == ["seg-000002.done", "seg-000003.done"]
    assert [f"t{i}" in ReplayBuffer(config) for i in range(4, 7)] == [True] * 3


# --- Ray ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_actor_inserts_and_a_blocked_sample_does_not_block_inserts(ray_local, tmp_path):
    actor = ReplayBufferActor.remote(BufferConfig(min_size_to_sample=2, dir=str(tmp_path), timeout_s=30))
    pending = actor.sample.remote(8)  # blocks inside the actor until two trajectories are stored
    first = make_traj("r0", [2, 1]).to_record_batch()
    assert ray_local.get(actor.insert.remote(first), timeout=30) == 1
    assert ray_local.get(actor.insert.remote(first), timeout=30) == 0  # a retried call stores nothing
    assert ray_local.get(actor.insert.remote(make_traj("r1", [0, 4])), timeout=30) == 1
    batch = ray_local.get(pending, timeout=30)
    assert len(batch) == 8 and set(batch.traj_ids) <= {"r0", "r1"}
    stats = ray_local.get(actor.stats.remote())
    assert (stats["size"], stats["duplicates"], stats["sampled"]) == (2, 1, 8)
    ray_local.get(actor.close.remote())
    assert segment_rows_on_disk(tmp_path) == 2
