"""The buffer as a Ray actor: the same class, run threaded.

`max_concurrency` > 1 makes Ray serve calls from a thread pool, so a sample waiting on the rate
limiter holds one thread while inserts proceed on the others (`ReplayBuffer` is thread-safe).
Actors should send `trajectory.to_record_batch()`: Arrow crosses the object store cheaply.

A buffer that restartable actors write to is named, and they look it up by name: an actor handle among a
restartable actor's constructor arguments may not survive to its restart (ray-project/ray#53727, which Ray
warns about on every such actor).
"""

import uuid

import ray

from draft_opd.buffer.replay_buffer import BufferConfig, ReplayBuffer

ReplayBufferActor = ray.remote(max_concurrency=16)(ReplayBuffer)


def start_named_buffer(config: BufferConfig, role: str = "replay") -> tuple[ray.actor.ActorHandle, str]:
    """A buffer actor under a fresh name (unique in the job, so runs in one driver never collide), and the name."""
    name = f"{role}-buffer-{uuid.uuid4().hex[:8]}"
    return ReplayBufferActor.options(name=name).remote(config), name
