"""Rollout actors: trajectories into the buffer, equal to plain greedy decoding, on a real local Ray cluster."""

from dataclasses import replace

import numpy as np
import pytest
import ray
import torch

from draft_opd.actors.prompts import PromptPool, load_prompts
from draft_opd.actors.rollout import RolloutConfig, RolloutWorker, start_rollout_actors
from draft_opd.buffer import BufferConfig, ReplayBuffer, start_named_buffer
from draft_opd.prompts.chat import render_prompt
from draft_opd.speculative.decode import DecodeConfig, generate
from draft_opd.speculative.loading import DraftSpec
from draft_opd.speculative.target import TargetConfig
from tests.conftest import TINY_FEATURE_LAYERS, TINY_MASK

TARGET = TargetConfig(testbed="tiny")
DRAFT = DraftSpec(
    kind="dflash",
    block_size=6,
    num_layers=1,
    target_layer_ids=TINY_FEATURE_LAYERS,
    mask_token_id=TINY_MASK,
    init="random",
)
ROLLOUT = RolloutConfig(prompts="gsm8k_train", num_prompts=6, max_new_tokens=24, topk_logprobs=2)


def plain_greedy(tiny_target, trajectory) -> list[int]:
    prompt = trajectory.input_ids[: trajectory.prompt_len]
    return generate(tiny_target, prompt, None, DecodeConfig(max_new_tokens=ROLLOUT.max_new_tokens)).tokens


def test_prompt_pool_shards_and_cycles_without_repeats():
    conversations = load_prompts("gsm8k_train", num_prompts=5)
    pools = [PromptPool(conversations, shard, 2) for shard in range(2)]
    first_epoch = [pools[0].next()[1].id for _ in range(3)] + [pools[1].next()[1].id for _ in range(2)]
    assert sorted(first_epoch) == sorted(c.id for c in conversations)
    assert pools[1].next() == (1, conversations[1]) and pools[1].position == 3
    with pytest.raises(ValueError, match="cannot feed 6 actors"):
        PromptPool(conversations, 5, 6)


def test_prompt_source_errors():
    with pytest.raises(ValueError, match="neither a benchmark"):
        load_prompts("gsm8k_trian")


def test_worker_trajectories_equal_plain_greedy_and_round_trip_the_buffer(tiny_target):
    buffer = ReplayBuffer(BufferConfig(topk=2))
    worker = RolloutWorker(TARGET, DRAFT, ROLLOUT, 0, buffer)
    stats = worker.run(3)
    assert stats["trajectories"] == 3 and buffer.stats()["size"] == 3 and stats["tau"] >= 1.0
    prompt_ids = [f"gsm8k_train/{i}" for i in range(3)]
    for pid in prompt_ids:
        stored = buffer.get(f"{pid}@0")
        assert stored.prompt_id == pid and stored.draft_version == 0
        assert stored.input_ids == plain_greedy(tiny_target, stored)
        assert len(stored.topk_ids) == len(stored.anchors)
    batch = buffer.sample(16)
    for i in range(len(batch)):
        item = batch.item(i)
        source = buffer.get(item.traj_id)
        assert item.rejected_tokens.tolist() == source.draft_tokens[item.step][source.accept_len[item.step] :]
        assert item.anchor == source.anchors[item.step]


def test_stored_features_are_fp16_target_features(tiny_target):
    buffer = ReplayBuffer()
    worker = RolloutWorker(TARGET, DRAFT, replace(ROLLOUT, store_features=True, topk_logprobs=0), 0, buffer)
    worker.run(1)
    stored = buffer.get("gsm8k_train/0@0")
    expected = tiny_target.forward(torch.tensor(stored.input_ids), 0, None).features
    assert stored.features.dtype == np.float16 and stored.features.shape == tuple(expected.shape)
    np.testing.assert_allclose(stored.features.astype(np.float32), expected.numpy(), atol=2e-2, rtol=1e-2)


def test_batched_rollouts_equal_batch_one_trajectories():
    """rollout.batch_size decodes several prompts per verify pass; at T = 0 the trajectories are batch 1's
    (log-probs and fp16 features up to the rounding of batched verification)."""
    rollout = replace(ROLLOUT, store_features=True, mode="sequential")
    one, many = ReplayBuffer(BufferConfig(topk=2)), ReplayBuffer(BufferConfig(topk=2))
    RolloutWorker(TARGET, DRAFT, rollout, 0, one).run(5)
    stats = RolloutWorker(TARGET, DRAFT, replace(rollout, batch_size=3), 0, many).run(5)
    assert stats["trajectories"] == 6 and stats["prompt_position"] == 6  # whole batches
    for i in range(5):
        a, b = one.get(f"gsm8k_train/{i}@0"), many.get(f"gsm8k_train/{i}@0")
        assert (b.input_ids, b.prompt_len, b.anchors, b.draft_tokens, b.accept_len, b.topk_ids) == (
            a.input_ids,
            a.prompt_len,
            a.anchors,
            a.draft_tokens,
            a.accept_len,
            a.topk_ids,
        )
        np.testing.assert_allclose(b.committed_logprobs, a.committed_logprobs, atol=1e-4)
        np.testing.assert_allclose(np.concatenate(b.draft_logprobs), np.concatenate(a.draft_logprobs), atol=1e-4)
        np.testing.assert_allclose(b.features.astype(np.float32), a.features.astype(np.float32), atol=2e-2)


def rows_of(rollout: RolloutConfig, count: int) -> dict:
    buffer = ReplayBuffer(BufferConfig(topk=2))
    worker = RolloutWorker(TARGET, DRAFT, rollout, 0, buffer)
    worker.run(count)
    return worker, {t: buffer.get(t) for t in buffer.traj_ids()}


def test_parallel_worker_trajectories_equal_sequential_ones_field_by_field():
    """rollout.mode=parallel through the worker and the buffer; tests/test_parallel_rollout.py covers fitted drafts."""
    rollout = replace(ROLLOUT, store_features=True)
    assert rollout.parallel and not replace(rollout, temperature=0.7).parallel  # auto: parallel at T = 0 only
    _, sequential = rows_of(replace(rollout, mode="sequential"), 4)
    worker, parallel = rows_of(replace(rollout, mode="parallel", batch_size=3), 4)
    assert len(sequential) == 4 and len(parallel) == 6  # run(n) rounds up to whole batches
    for traj_id, a in sequential.items():
        b = parallel[traj_id]
        exact = ("input_ids", "prompt_len", "anchors", "draft_tokens", "accept_len", "topk_ids", "draft_version")
        assert [getattr(b, f) for f in exact] == [getattr(a, f) for f in exact]
        np.testing.assert_allclose(b.committed_logprobs, a.committed_logprobs, atol=1e-5)
        np.testing.assert_allclose(np.concatenate(b.draft_logprobs), np.concatenate(a.draft_logprobs), atol=1e-5)
        for x, y in zip(b.topk_logprobs, a.topk_logprobs):  # a step drafting nothing has no top-k
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
        np.testing.assert_allclose(b.features.astype(np.float32), a.features.astype(np.float32), atol=2e-2)
    assert sorted(worker.text.known) == [f"gsm8k_train/{i}" for i in range(6)]  # whole text batches of 3


def test_a_later_epoch_reuses_the_greedy_text():
    worker = RolloutWorker(TARGET, DRAFT, replace(ROLLOUT, num_prompts=2), 0, None)
    first = list(worker.rollouts(2))
    texts = dict(worker.text.known)
    worker.text.decode = None  # decoding again would fail
    second = list(worker.rollouts(2))
    assert [t.traj_id for t in second] == ["gsm8k_train/0@1", "gsm8k_train/1@1"]
    assert [t.input_ids for t in second] == [t.input_ids for t in first] == [texts[t.prompt_id] for t in first]


def test_parallel_mode_at_a_temperature_is_a_clear_error():
    with pytest.raises(ValueError, match="rollout.mode=parallel needs rollout.temperature=0"):
        replace(ROLLOUT, mode="parallel", temperature=1.0)
    with pytest.raises(ValueError, match="rollout.mode='fast' is not one of auto, parallel, sequential"):
        replace(ROLLOUT, mode="fast")


def test_a_restored_worker_rolls_out_again_the_prompts_of_lost_rows_first():
    """A corrupt segment's rows are gone after a restart while later rows are held: those prompts are redone;
    rows before the first one held were evicted (FIFO) and are not."""
    held = [f"gsm8k_train/{i}@0" for i in (1, 2, 4, 5)]  # 0 evicted, 3 lost, 5 rolled out after the checkpoint
    worker = RolloutWorker(TARGET, DRAFT, ROLLOUT, 0, None)
    assert worker.restore(5, held) == 6 and worker.redo == [3]
    assert [t.traj_id for t in worker.rollouts(2)] == ["gsm8k_train/3@0", "gsm8k_train/0@1"]


def test_batch_size_below_one_is_a_clear_error():
    with pytest.raises(ValueError, match="rollout.batch_size must be >= 1"):
        RolloutWorker(TARGET, DRAFT, replace(ROLLOUT, batch_size=0))


def test_newer_published_weights_change_proposals_and_older_ones_are_ignored():
    worker = RolloutWorker(TARGET, DRAFT, ROLLOUT, 0, None)
    prompt = render_prompt(worker.target.tokenizer, [{"role": "user", "content": "2+2?"}], True)
    before = worker.proposals(prompt, 5)
    weights = {k: torch.randn_like(v) for k, v in worker.drafter.state_dict().items()}
    assert worker.set_draft(3, weights) and worker.draft_version() == 3
    after = worker.proposals(prompt, 5)
    assert after != before
    assert not worker.set_draft(2, {k: torch.zeros_like(v) for k, v in weights.items()})
    assert worker.proposals(prompt, 5) == after


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_rollout_actors_fill_the_buffer_on_a_local_ray_cluster(ray_cluster, tiny_target, capfd):
    buffer, name = start_named_buffer(BufferConfig(topk=2))
    rollout = replace(ROLLOUT, num_actors=2, num_cpus=1)
    actors, group = start_rollout_actors(TARGET, DRAFT, rollout, name)
    stats = ray.get([a.run.remote(2) for a in actors], timeout=180)
    assert [s["actor"] for s in stats] == ["rollout-0", "rollout-1"]
    assert ray.get(buffer.stats.remote())["size"] == 4
    for pid in ["gsm8k_train/0", "gsm8k_train/1", "gsm8k_train/2", "gsm8k_train/3"]:  # shards 0,2 and 1,3
        stored = ray.get(buffer.get.remote(f"{pid}@0"))
        assert stored.input_ids == plain_greedy(tiny_target, stored)
    assert len(set(ray.get([a.pid.remote() for a in actors]))) == 2
    # the buffer reached by name: Ray has no restart-breaking handle among their arguments to warn about
    assert "constructor arguments in the object store" not in capfd.readouterr().err


def test_more_actors_than_resources_is_a_clear_error(ray_cluster):
    with pytest.raises(ValueError, match="need more than the cluster has"):
        start_rollout_actors(TARGET, DRAFT, replace(ROLLOUT, num_actors=5, num_cpus=1), None)
