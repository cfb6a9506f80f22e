"""Arrow-backed replay buffer of speculative-decoding trajectories (imports nothing else of ours)."""

from buffer.actor import ReplayBufferActor
from buffer.rate_limiter import RateLimitTimeout
from buffer.replay_buffer import BufferConfig, ReplayBuffer
from buffer.sampler import SampleBatch, SampledItem
from buffer.schema import SCHEMA, Trajectory, validate
from buffer.segments import SegmentWarning, foreign_files, holds_sealed_segments

__all__ = ["SCHEMA", "BufferConfig", "RateLimitTimeout", "ReplayBuffer", "ReplayBufferActor", "SampleBatch",
           "SampledItem", "SegmentWarning", "Trajectory", "foreign_files", "holds_sealed_segments", "validate"]
