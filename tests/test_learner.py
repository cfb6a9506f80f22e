"""DeepSpeed learner ranks as Ray actors: ZeRO-2/3 at world size 2 update like world size 1; published weights
reach rollout actors and change their proposals."""

import math

import pytest
import ray
import torch

from actors.rollout import RolloutConfig, RolloutWorker
from buffer import BufferConfig, ReplayBuffer
from learner.engine import Learner, LearnerActor, LearnerConfig, free_port
from learner.objective import ObjectiveConfig
from speculative.drafter import DraftSpec
from speculative.target import TargetConfig
from tests.conftest import TINY_FEATURE_LAYERS, TINY_MASK

TARGET = TargetConfig(testbed="tiny")
DRAFT = DraftSpec(kind="dflash", block_size=5, num_layers=1, target_layer_ids=TINY_FEATURE_LAYERS,
                  mask_token_id=TINY_MASK, init="random")


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def batches():
    buffer = ReplayBuffer(BufferConfig(seed=1))
    RolloutWorker(TARGET, DRAFT, RolloutConfig(num_prompts=4, max_new_tokens=24), 0, buffer).run(4)
    return [buffer.sample(8) for _ in range(3)]


def trained_weights(world_size: int, stage: int, batches) -> dict[str, torch.Tensor]:
    cfg = LearnerConfig(world_size=world_size, zero_stage=stage, lr=1e-3, warmup_steps=1, num_cpus=1, timeout_s=60)
    port = free_port()
    ranks = [LearnerActor.options(num_cpus=1).remote(TARGET, DRAFT, cfg, ObjectiveConfig(), r, "127.0.0.1", port)
             for r in range(world_size)]
    for batch in batches:  # every rank gets the same batch: averaged gradients equal the single-rank gradient
        ray.get([r.train_step.remote("opd", batch) for r in ranks], timeout=120)
    weights = ray.get([r.full_weights.remote() for r in ranks], timeout=120)
    for r in ranks:
        ray.kill(r)
    assert all(w is None for w in weights[1:])
    return weights[0]


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_world_size_two_matches_world_size_one(ray_cluster, batches, stage):
    single = trained_weights(1, stage, batches)
    double = trained_weights(2, stage, batches)
    initial = RolloutWorker(TARGET, DRAFT, RolloutConfig(num_prompts=1), 0, None).drafter.state_dict()
    assert set(single) == set(double) == set(initial)
    assert any(not torch.allclose(single[k], initial[k]) for k in single)  # it did train
    for k in single:
        torch.testing.assert_close(double[k], single[k], atol=1e-5, rtol=1e-4)


def test_opd_phase_uses_its_own_learning_rate(batches):
    """opd_lr=0 freezes the draft in the OPD phase only (Adam's step is proportional to the lr)."""
    learner = Learner(TARGET, DRAFT, LearnerConfig(lr=1e-2, opd_lr=0.0, warmup_steps=1, timeout_s=60),
                      ObjectiveConfig())
    for batch in batches[:2]:  # past DeepSpeed's WarmupLR, whose first steps run at lr 0
        learner.train_step("sft", batch)
    before = {k: v.clone() for k, v in learner.drafter.state_dict().items()}
    learner.train_step("opd", batches[0])
    after_opd = learner.drafter.state_dict()
    assert all(torch.equal(before[k], after_opd[k]) for k in before)
    learner.train_step("sft", batches[2])
    assert any(not torch.equal(before[k], v) for k, v in learner.drafter.state_dict().items())


def test_cosine_schedule_sets_the_lr_of_every_step(batches):
    """learner.lr_schedule=cosine: linear warm-up to lr, then cosine decay to 0 at total_steps (DeepSpeed's
    WarmupCosineLR, which steps after each optimizer step: step s runs at the schedule's value for s - 1, 0 for
    step 0). The lr each step runs at follows it, and the first step (lr 0) leaves the draft as it was."""
    lr, warmup, total = 1e-2, 2, 6
    learner = Learner(TARGET, DRAFT, LearnerConfig(lr=lr, lr_schedule="cosine", warmup_steps=warmup,
                                                   total_steps=total, timeout_s=60), ObjectiveConfig())
    initial = {k: v.clone() for k, v in learner.drafter.state_dict().items()}
    used = []
    for step in range(total):
        used.append(learner.engine.optimizer.param_groups[0]["lr"])
        learner.train_step("sft", batches[step % len(batches)])
        if step == 0:
            assert all(torch.equal(initial[k], v) for k, v in learner.drafter.state_dict().items())
    def schedule(s: int) -> float:
        if s < warmup:
            return lr * max(s, 0) / warmup
        return lr * (1 + math.cos(math.pi * min(1.0, (s - warmup + 1) / (total - warmup)))) / 2

    assert used == pytest.approx([schedule(s - 1) for s in range(total)])
    assert max(used) == pytest.approx(lr * (1 + math.cos(math.pi / 4)) / 2)  # just past warm-up, then down
    assert any(not torch.equal(initial[k], v) for k, v in learner.drafter.state_dict().items())
