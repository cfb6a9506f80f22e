"""The buffer as a Ray actor: the same class, run threaded.

`max_concurrency` > 1 makes Ray serve calls from a thread pool, so a sample waiting on the rate
limiter holds one thread while inserts proceed on the others (`ReplayBuffer` is thread-safe).
Actors should send `trajectory.to_record_batch()`: Arrow crosses the object store cheaply.
"""

import ray

from draft_opd.buffer.replay_buffer import ReplayBuffer

ReplayBufferActor = ray.remote(max_concurrency=16)(ReplayBuffer)
