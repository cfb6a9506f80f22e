"""Arrow-backed replay buffer of speculative-decoding trajectories (imports nothing else of ours)."""

from draft_opd.buffer.actor import ReplayBufferActor, start_named_buffer
from draft_opd.buffer.rate_limiter import RateLimitTimeout
from draft_opd.buffer.replay_buffer import CORPUS_CAPACITY, BufferConfig, ReplayBuffer
from draft_opd.buffer.sampler import SampleBatch, SampledItem
from draft_opd.buffer.schema import SCHEMA, Trajectory, validate
from draft_opd.buffer.segments import SegmentWarning, foreign_files, holds_sealed_segments

__all__ = [
    "CORPUS_CAPACITY",
    "SCHEMA",
    "BufferConfig",
    "RateLimitTimeout",
    "ReplayBuffer",
    "ReplayBufferActor",
    "SampleBatch",
    "SampledItem",
    "SegmentWarning",
    "Trajectory",
    "foreign_files",
    "holds_sealed_segments",
    "start_named_buffer",
    "validate",
]
