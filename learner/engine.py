"""One learner rank: a DeepSpeed ZeRO engine around the drafter (stage 1/2/3, fp32 or bf16, gloo or NCCL).

Ranks run as Ray actors (`LearnerActor`) that form one torch.distributed group; the driver asks
every rank to step, and each samples its own batch from the replay buffer. Full weights for
publishing are gathered from ZeRO-3 partitions with `deepspeed.zero.GatheredParameters`, which
every rank must enter. Every collective carries a timeout.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, replace
from datetime import timedelta

import numpy as np
import ray
import torch

from draft_opd.learner.objective import ObjectiveConfig, phase_loss
from draft_opd.learner.replay import TargetSource
from draft_opd.speculative.loading import DraftSpec, make_drafter
from draft_opd.speculative.runtime import set_threads
from draft_opd.speculative.target import TargetConfig, load_target


@dataclass
class LearnerConfig:
    world_size: int = 1
    zero_stage: int = 2
    dtype: str = "float32"  # float32 | bfloat16
    lr: float = 6e-4  # DFlash SFT; the Draft-OPD run used 3e-4
    opd_lr: float | None = None  # learning rate of the OPD phase on the same schedule; None: lr
    lr_schedule: str = "constant"  # constant: warm-up, then lr; cosine: linear warm-up, then cosine decay to 0
    warmup_steps: int = 10
    total_steps: int = 0  # cosine: the step its decay ends; 0: train.sft_steps + train.opd_steps (set at load)
    # at the SFT->OPD switch: Adam's moments zeroed and the lr schedule restarted (warm-up, then decay over
    # opd_total_steps), as the Draft-OPD reference starts OPD as a fresh run; false: SFT's state carries over
    opd_fresh_optimizer: bool = True
    opd_total_steps: int = 0  # cosine with opd_fresh_optimizer: OPD steps its decay spans; 0: train.opd_steps (at load)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 32  # sampled blocks per rank per step
    threads: int = 1  # torch threads per rank
    offline_threads: int = 0  # during offline SFT, when no rollout actor runs; 0: this node's cores / world_size
    num_cpus: float = 1.0  # per rank
    num_gpus: float = 0.0  # per rank
    timeout_s: float = 300.0  # any collective or blocking call
    seed: int = 0


def lr_scheduler(cfg: LearnerConfig, total_steps: int | None = None) -> dict:
    """DeepSpeed's scheduler for `cfg.lr_schedule`: WarmupLR (log warm-up), or WarmupCosineLR as the Draft-OPD
    reference script schedules its lr (linear warm-up, cosine to 0 at `total_steps`, default cfg.total_steps)."""
    total_steps = cfg.total_steps if total_steps is None else total_steps
    if cfg.lr <= 0:
        raise ValueError(f"learner.lr must be > 0 (got {cfg.lr})")
    warmup = max(cfg.warmup_steps, 1)
    if cfg.lr_schedule == "constant":
        return {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": cfg.lr, "warmup_num_steps": warmup},
        }
    if cfg.lr_schedule != "cosine":
        raise ValueError(f"learner.lr_schedule must be constant or cosine (got {cfg.lr_schedule!r})")
    if total_steps < 1:
        raise ValueError(
            "learner.lr_schedule=cosine needs learner.total_steps >= 1 (a run config sets it to "
            "train.sft_steps + train.opd_steps) and, with learner.opd_fresh_optimizer, "
            "learner.opd_total_steps >= 1 (a run config sets it to train.opd_steps)"
        )
    return {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": total_steps,
            "warmup_num_steps": warmup,
            "warmup_min_ratio": 0.0,
            "cos_min_ratio": 0.0,
            "warmup_type": "linear",
        },
    }


def deepspeed_config(cfg: LearnerConfig) -> dict:
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"learner.zero_stage must be 0, 1, 2 or 3 (got {cfg.zero_stage})")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"learner.dtype must be float32 or bfloat16 (got {cfg.dtype!r})")
    return {
        "train_micro_batch_size_per_gpu": 1,  # one sampled batch per step; its size is learner.batch_size
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": cfg.dtype == "bfloat16"},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "torch_adam": True},
        },  # no fused-Adam build on CPU
        "scheduler": lr_scheduler(cfg),
        "zero_optimization": {"stage": cfg.zero_stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def reset_adam_state(optimizer) -> None:
    """Zero every tensor of the optimizer's per-parameter state (Adam's moments and step count) in place, through
    a ZeRO wrapper to the torch optimizer inside: the next step is a fresh Adam's first step, and the state keeps
    the shapes that ZeRO's checkpoints expect."""
    base = getattr(optimizer, "optimizer", optimizer)
    for state in base.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                value.zero_()
            else:
                state[key] = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, address: str, port: int) -> dict[str, str]:
    """torch.distributed's variables for one rank. Ray shows each rank only the GPU it was given
    (CUDA_VISIBLE_DEVICES), so the rank's device is index 0 there, whatever its global rank."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": "0",
        "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": address,
        "MASTER_PORT": str(port),
    }


@ray.remote(num_cpus=0)
def rendezvous() -> tuple[str, int, str]:
    """(address, free port, node id) of the node this task runs on: run where rank 0 will run, since the
    store that the ranks meet at is rank 0's."""
    return ray.util.get_node_ip_address(), free_port(), ray.get_runtime_context().get_node_id()


def init_process_group(rank: int, world_size: int, address: str, port: int, timeout_s: float) -> None:
    import deepspeed

    os.environ.update(rank_env(rank, world_size, address, port))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed would JIT-compile its shared-memory allreduce here: ~30 s, and a rank killed mid-build leaves
        # torch's build lock behind, which hangs every later init. gloo's own allreduce serves CPU ranks.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))


class Learner:
    """A learner rank. With world_size 1 it also runs in-process (tests, one-process runs)."""

    def __init__(
        self,
        target: TargetConfig,
        draft: DraftSpec,
        cfg: LearnerConfig,
        objective: ObjectiveConfig,
        rank: int = 0,
        address: str = "127.0.0.1",
        port: int | None = None,
        buffer=None,
    ):
        import deepspeed

        set_threads(cfg.threads)
        self.cfg, self.objective, self.rank, self.buffer = cfg, objective, rank, buffer
        init_process_group(rank, cfg.world_size, address, port or free_port(), cfg.timeout_s)
        # a bf16 engine casts the drafter; the frozen target it shares embeddings and head with follows
        self.target = load_target(replace(target, dtype=cfg.dtype) if cfg.dtype == "bfloat16" else target)
        drafter = make_drafter(draft.or_random(), self.target)
        drafter.train()
        self.engine, *_ = deepspeed.initialize(
            model=drafter, model_parameters=list(drafter.parameters()), config=deepspeed_config(cfg)
        )
        self.features = TargetSource(self.target)
        self.steps = 0
        self.phase: str | None = None  # the phase of the last step taken

    @property
    def drafter(self):
        return self.engine.module

    def placement(self) -> dict[str, str]:
        """Where this rank runs and the distributed environment it was given (for checks across nodes)."""
        keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")
        return {"node_id": ray.get_runtime_context().get_node_id(), **{k: os.environ.get(k, "") for k in keys}}

    def train_step(self, phase: str, batch) -> dict[str, float]:
        """One optimizer step on `batch` (this rank's share); gradients are averaged across ranks."""
        start = time.perf_counter()
        self.enter_phase(phase)
        rng = np.random.default_rng((self.cfg.seed, self.rank, self.steps))  # a resumed run draws the same
        out = phase_loss(phase, self.engine, batch, self.features, self.objective, rng)
        self.engine.backward(out["loss"])
        if phase == "opd" and self.cfg.opd_lr is not None:
            for group in self.engine.optimizer.param_groups:  # the scheduler sets it again after each step
                group["lr"] *= self.cfg.opd_lr / self.cfg.lr
        self.engine.step()
        self.steps += 1
        metrics = {k: float(v.detach()) for k, v in out.items()}
        metrics["step_s"] = time.perf_counter() - start
        metrics.setdefault("blocks", len(batch))  # SFT reports the blocks and label tokens it drew itself
        metrics.setdefault("tokens", int(batch.committed_mask.sum() + batch.rejected_mask.sum()))
        return metrics

    def enter_phase(self, phase: str) -> None:
        """Note the phase of the coming step; at the switch into OPD with learner.opd_fresh_optimizer, start OPD
        as the reference does, from a fresh optimizer: Adam's state zeroed, the schedule back to its warm-up."""
        if phase == "opd" and self.phase != "opd" and self.cfg.opd_fresh_optimizer:
            reset_adam_state(self.engine.optimizer)
            self.engine.lr_scheduler = self.opd_schedule()
        self.phase = phase

    def opd_schedule(self):
        """The OPD phase's own scheduler, from its first step (lr at its warm-up's start)."""
        from deepspeed.runtime import lr_schedules

        spec = lr_scheduler(self.cfg, self.cfg.opd_total_steps)
        for group in self.engine.optimizer.param_groups:  # WarmupCosineLR scales the lr it finds here
            group["lr"] = self.cfg.lr
        return getattr(lr_schedules, spec["type"])(self.engine.optimizer, **spec["params"])

    def use_buffer(self, buffer, offline: bool) -> None:
        """Sample from `buffer` from now on: an offline corpus, whose phase has the cores to itself, or the
        rollouts' buffer, whose actors need theirs."""
        self.buffer = buffer
        threads = (
            (self.cfg.offline_threads or max(1, (os.cpu_count() or 1) // self.cfg.world_size))
            if offline
            else self.cfg.threads
        )
        set_threads(threads)

    def step(self, phase: str, learner_version: int) -> dict[str, float]:
        """Sample this rank's batch from the buffer and take one step."""
        size, per_row, staleness = sample_request(phase, self.cfg.batch_size, self.objective)
        batch = ray.get(
            self.buffer.sample.remote(size, learner_version, max_staleness=staleness, blocks_per_row=per_row),
            timeout=self.cfg.timeout_s,
        )
        metrics = self.train_step(phase, batch)
        metrics["staleness"] = float(np.mean(learner_version - batch.draft_version[batch.traj_index]))
        return metrics

    def save_checkpoint(self, directory: str) -> None:
        """DeepSpeed checkpoint (weights, optimizer, scheduler, ZeRO shards); every rank must call."""
        self.engine.save_checkpoint(directory, tag="learner", client_state={"steps": self.steps, "phase": self.phase})

    def load_checkpoint(self, directory: str) -> int:
        """Restore a `save_checkpoint`; returns the steps done."""
        path, client = self.engine.load_checkpoint(directory, tag="learner")
        if path is None:
            raise FileNotFoundError(f"no learner checkpoint in {directory}/learner")
        self.steps = int(client["steps"])
        self.phase = client.get("phase")
        if self.phase == "opd" and self.cfg.opd_fresh_optimizer:  # OPD's own schedule, where the checkpoint left it
            position = self.engine.lr_scheduler.state_dict()
            lrs = [group["lr"] for group in self.engine.optimizer.param_groups]
            self.engine.lr_scheduler = self.opd_schedule()
            self.engine.lr_scheduler.load_state_dict(position)
            for group, lr in zip(self.engine.optimizer.param_groups, lrs):
                group["lr"] = lr
        return self.steps

    def full_weights(self) -> dict[str, torch.Tensor] | None:
        """The complete draft weights (fp32, CPU) on rank 0; every rank must call (ZeRO-3 gathers)."""
        import deepspeed

        params = list(self.drafter.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=self.cfg.zero_stage == 3):
            if self.rank != 0:
                return None
            return {k: v.detach().float().cpu().clone() for k, v in self.drafter.state_dict().items()}

    def save_draft(self, path: str) -> str | None:
        weights = self.full_weights()
        if weights is None:
            return None
        drafter = self.drafter
        state = {k: v.to(next(iter(drafter.state_dict().values())).dtype) for k, v in weights.items()}
        snapshot = type(drafter)(drafter.cfg, *drafter._shared)
        snapshot.load_state_dict(state)
        return str(snapshot.save(path))


def sample_request(phase: str, batch_size: int, objective: ObjectiveConfig) -> tuple[int, int, int | None]:
    """(blocks, blocks per row, staleness bound) of a step's buffer call: OPD draws its batch_size blocks from
    recent drafts, objective.opd_blocks_per_row to a row; SFT draws rows and its own anchors in each."""
    if phase == "opd":
        return batch_size, objective.opd_blocks_per_row, objective.opd_max_staleness
    return -(-batch_size // objective.sft_anchors_per_row), 1, None


LearnerActor = ray.remote(Learner)
