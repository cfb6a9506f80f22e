"""DeepSpeed learner ranks as Ray actors: ZeRO-2/3 at world size 2 update like world size 1; published weights
reach rollout actors and change their proposals."""

import math

import pytest
import ray
import torch

from draft_opd.actors.rollout import RolloutConfig, RolloutWorker
from draft_opd.buffer import BufferConfig, ReplayBuffer
from draft_opd.learner.engine import Learner, LearnerActor, LearnerConfig, free_port, sample_request
from draft_opd.learner.objective import ObjectiveConfig
from draft_opd.speculative.loading import DraftSpec
from draft_opd.speculative.target import TargetConfig
from tests.conftest import TINY_FEATURE_LAYERS, TINY_MASK

TARGET = TargetConfig(testbed="tiny")
DRAFT = DraftSpec(
    kind="dflash",
    block_size=5,
    num_layers=1,
    target_layer_ids=TINY_FEATURE_LAYERS,
    mask_token_id=TINY_MASK,
    init="random",
)


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
    ranks = [
        LearnerActor.options(num_cpus=1).remote(TARGET, DRAFT, cfg, ObjectiveConfig(), r, "127.0.0.1", port)
        for r in range(world_size)
    ]
    for batch in batches:  # every rank gets the same batch: averaged gradients equal the single-rank gradient
        ray.get([r.train_step.remote("opd", batch) for r in ranks], timeout=120)
    weights = ray.get([r.full_weights.remote() for r in ranks], timeout=120)
    for r in ranks:
        ray.kill(r)
    assert all(w is None for w in weights[1:])
    return weights[0]


# ZeRO-3 (parameters partitioned too) takes half a minute more: it runs with the slow suite
@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.slow)])
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
    learner = Learner(
        TARGET,
        DRAFT,
        LearnerConfig(lr=1e-2, opd_lr=0.0, warmup_steps=1, opd_fresh_optimizer=False, timeout_s=60),
        ObjectiveConfig(),
    )
    for batch in batches[:2]:  # past DeepSpeed's WarmupLR, whose first steps run at lr 0
        learner.train_step("sft", batch)
    before = {k: v.clone() for k, v in learner.drafter.state_dict().items()}
    learner.train_step("opd", batches[0])
    after_opd = learner.drafter.state_dict()
    assert all(torch.equal(before[k], after_opd[k]) for k in before)
    learner.train_step("sft", batches[2])
    assert any(not torch.equal(before[k], v) for k, v in learner.drafter.state_dict().items())


def cosine_lr(s: int, lr: float, warmup: int, total: int) -> float:
    """WarmupCosineLR's lr after s + 1 scheduler steps (linear warm-up, cosine to 0), written out by hand."""
    if s < warmup:
        return lr * max(s, 0) / warmup
    return lr * (1 + math.cos(math.pi * min(1.0, (s - warmup + 1) / (total - warmup)))) / 2


def test_cosine_schedule_sets_the_lr_of_every_step(batches):
    """learner.lr_schedule=cosine: linear warm-up to lr, then cosine decay to 0 at total_steps (DeepSpeed's
    WarmupCosineLR, which steps after each optimizer step: step s runs at the schedule's value for s - 1, 0 for
    step 0). The lr each step runs at follows it, and the first step (lr 0) leaves the draft as it was."""
    lr, warmup, total = 1e-2, 2, 6
    learner = Learner(
        TARGET,
        DRAFT,
        LearnerConfig(lr=lr, lr_schedule="cosine", warmup_steps=warmup, total_steps=total, timeout_s=60),
        ObjectiveConfig(),
    )
    initial = {k: v.clone() for k, v in learner.drafter.state_dict().items()}
    used = []
    for step in range(total):
        used.append(learner.engine.optimizer.param_groups[0]["lr"])
        learner.train_step("sft", batches[step % len(batches)])
        if step == 0:
            assert all(torch.equal(initial[k], v) for k, v in learner.drafter.state_dict().items())
    assert used == pytest.approx([cosine_lr(s - 1, lr, warmup, total) for s in range(total)])
    assert max(used) == pytest.approx(lr * (1 + math.cos(math.pi / 4)) / 2)  # just past warm-up, then down
    assert any(not torch.equal(initial[k], v) for k, v in learner.drafter.state_dict().items())


def adam_states(learner: Learner) -> list[dict]:
    """The torch AdamW's per-parameter state inside the ZeRO-2 optimizer."""
    return list(learner.engine.optimizer.optimizer.state.values())


def cosine_learner(fresh: bool) -> Learner:
    cfg = LearnerConfig(
        lr=1e-2,
        lr_schedule="cosine",
        warmup_steps=2,
        total_steps=10,
        opd_total_steps=4,
        opd_fresh_optimizer=fresh,
        timeout_s=60,
    )
    return Learner(TARGET, DRAFT, cfg, ObjectiveConfig())


def lrs_of_steps(learner: Learner, phase: str, batches) -> list[float]:
    """The lr each of these steps ran at."""
    used = []
    for batch in batches:
        used.append(learner.engine.optimizer.param_groups[0]["lr"])
        learner.train_step(phase, batch)
    return used


@pytest.mark.parametrize("fresh", [True, False])
def test_opd_starts_from_a_fresh_optimizer_or_carries_sfts(batches, fresh):
    """learner.opd_fresh_optimizer: at the SFT->OPD switch Adam's moments are zero before the first OPD update
    and the lr restarts its warm-up, decaying over opd_total_steps; off, both carry on from SFT's 3 steps."""
    learner = cosine_learner(fresh)
    lrs_of_steps(learner, "sft", batches)
    before = [{k: v.clone() for k, v in state.items()} for state in adam_states(learner)]
    assert any(state["exp_avg"].abs().sum() > 0 and state["exp_avg_sq"].abs().sum() > 0 for state in before)
    learner.enter_phase("opd")
    for state, earlier in zip(adam_states(learner), before):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.count_nonzero(state[key]) == 0 if fresh else torch.equal(state[key], earlier[key])
    used = lrs_of_steps(learner, "opd", [*batches, batches[0]])
    if fresh:
        assert used == pytest.approx([cosine_lr(s - 1, 1e-2, 2, 4) for s in range(4)])
    else:
        assert used == pytest.approx([cosine_lr(s - 1, 1e-2, 2, 10) for s in range(3, 7)])
    learner.enter_phase("opd")  # a later OPD step is no switch
    assert not any(torch.count_nonzero(state["exp_avg"]) == 0 for state in adam_states(learner))


def test_checkpoint_during_opd_resumes_identically(batches, tmp_path):
    """Saved two steps into a fresh-optimizer OPD, loaded into a new Learner: the next steps run at the same lr
    (OPD's own schedule) from the same moments, to the same weights."""
    learner = cosine_learner(True)
    lrs_of_steps(learner, "sft", batches[:2])
    lrs_of_steps(learner, "opd", batches[:2])
    learner.save_checkpoint(str(tmp_path))
    used = lrs_of_steps(learner, "opd", batches[1:])
    resumed = cosine_learner(True)
    assert resumed.load_checkpoint(str(tmp_path)) == 4
    assert lrs_of_steps(resumed, "opd", batches[1:]) == pytest.approx(used)
    assert used == pytest.approx([cosine_lr(s - 1, 1e-2, 2, 4) for s in (2, 3)])
    expected = learner.drafter.state_dict()
    for k, v in resumed.drafter.state_dict().items():
        torch.testing.assert_close(v, expected[k], atol=0, rtol=0)


@pytest.mark.parametrize("phase", ["sft", "opd"])
def test_a_bf16_engine_trains_what_an_fp32_engine_trains(batches, phase):
    """learner.dtype=bfloat16: DeepSpeed casts the drafter, the learner's target follows it (they share the
    embeddings and head), and the same steps move the weights the way fp32 steps do, up to bf16 rounding."""
    initial = RolloutWorker(TARGET, DRAFT, RolloutConfig(num_prompts=1), 0, None).drafter.state_dict()
    moved = {}
    for dtype in ("float32", "bfloat16"):
        learner = Learner(
            TARGET, DRAFT, LearnerConfig(dtype=dtype, lr=1e-2, warmup_steps=1, timeout_s=60), ObjectiveConfig()
        )
        assert next(learner.drafter.parameters()).dtype == learner.target.dtype == getattr(torch, dtype)
        for batch in batches:
            assert math.isfinite(learner.train_step(phase, batch)["loss"])
        weights = learner.full_weights()
        assert all(w.dtype == torch.float32 for w in weights.values())
        moved[dtype] = torch.cat([(weights[k] - initial[k]).flatten() for k in sorted(initial)])
    assert moved["float32"].norm() > 0
    assert (moved["bfloat16"] - moved["float32"]).norm() < 0.3 * moved["float32"].norm()


def test_a_step_asks_the_buffer_for_blocks_per_row_in_opd_and_for_rows_in_sft():
    """OPD draws its batch's blocks several to a row (one drafter pass over each row's context serves them) from
    recent drafts; SFT draws batch_size / sft_anchors_per_row rows and picks its own anchors in them."""
    objective = ObjectiveConfig(opd_blocks_per_row=8, opd_max_staleness=2, sft_anchors_per_row=16)
    assert sample_request("opd", 64, objective) == (64, 8, 2)
    assert sample_request("sft", 64, objective) == (4, 1, None)
    assert sample_request("sft", 20, objective) == (2, 1, None)  # rounded up: never fewer blocks than asked
    assert sample_request("opd", 16, ObjectiveConfig()) == (16, 1, None)  # the default: one block a row
