"""The replay buffer: idempotent inserts, FIFO capacity, rate-limited staleness-bounded sampling,
optional persistence. One class serves in-process use and, wrapped by `buffer.actor`, Ray."""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from draft_opd.buffer.rate_limiter import RateLimiter, wait_or_raise
from draft_opd.buffer.sampler import SampleBatch, Sampler, step_weight
from draft_opd.buffer.schema import SCHEMA, Columns, Trajectory, ragged, validate
from draft_opd.buffer.segments import SegmentLog, SegmentWarning
from draft_opd.buffer.store import TrajectoryStore

CORPUS_CAPACITY = 10_000_000  # trajectories: a buffer opened with it (a corpus) is never evicted


@dataclass
class BufferConfig:
    capacity: int = 10_000  # trajectories kept; the oldest are evicted first
    min_size_to_sample: int = 1  # trajectories stored before the first sample
    samples_per_insert: float | None = None  # sampled items (blocks) per inserted trajectory; None: no ratio limit
    ratio_tolerance: float = 4096.0  # Reverb's error buffer, in items: how far the ratio may drift either way
    max_staleness: int | None = None  # skip rows with learner_version - draft_version > max_staleness
    sample_policy: str = "uniform"  # "uniform" over anchors or "rejection"-weighted (see buffer.sampler)
    segment_rows: int = 256  # a segment is sealed once it holds this many rows (a batch insert may overshoot)
    dir: str | None = None  # persistence directory; None keeps the buffer in memory only
    timeout_s: float | None = 60.0  # how long a blocked insert/sample waits; None waits forever
    seed: int = 0
    topk: int = 0  # k of the stored teacher top-k; 0 when trajectories carry none


class ReplayBuffer:
    """Thread-safe: one lock guards all state, and blocked calls wait on its condition, releasing it.

    Idempotency: a traj_id seen before (inserted in this process, or loaded from disk at open) is
    never stored again, even after eviction, so retried Ray calls cannot duplicate rows.
    Reopening a directory counts the loaded rows as inserts; `load_state_dict` then restores a
    checkpoint's counters.
    """

    def __init__(self, config: BufferConfig | None = None):
        self.config = config = config or BufferConfig()
        if config.segment_rows < 1:
            raise ValueError(f"segment_rows={config.segment_rows} must be at least 1")
        if config.topk < 0:
            raise ValueError(f"topk={config.topk} must be >= 0")
        if config.max_staleness is not None and config.max_staleness < 0:
            raise ValueError(f"max_staleness={config.max_staleness} must be >= 0 (or None for no bound)")
        self._limiter = RateLimiter(
            config.capacity, config.min_size_to_sample, config.samples_per_insert, config.ratio_tolerance
        )
        self._store = TrajectoryStore(config.topk, step_weight(config.sample_policy))
        self._sampler = Sampler(config.seed)
        self._cond = threading.Condition()
        self._seen: set[str] = set()
        self._counts = {"duplicates": 0, "evicted": 0, "loaded": 0}
        self._min_version: int | None = None  # asked for by the latest sample call
        self._log = SegmentLog(config.dir, config.segment_rows) if config.dir is not None else None
        if self._log is not None:
            self._load()

    def _load(self) -> None:
        with self._cond:
            for segment, batch in self._log.load():
                self._load_batch(segment, batch)

    def _load_batch(self, segment: int, batch: pa.RecordBatch) -> None:
        try:
            self._check_topk(batch)
            cols = validate(batch)
        except ValueError as e:
            warnings.warn(
                f"replay buffer: skipped rows of {self._log.path(segment, 'arrow')}: {e}. Fix: open it "
                "with the BufferConfig (topk) it was written with, or delete it.",
                SegmentWarning,
                stacklevel=2,
            )
            return
        self._counts["loaded"] += self._add_rows(batch, cols, loaded_from=segment)

    def insert(self, item: Trajectory | pa.RecordBatch, timeout_s: float | None = None) -> int:
        """Store a trajectory, or every row of a (multi-row) record batch; returns how many rows were new.

        A batch is validated, indexed and written to disk in one vectorized pass per run of rows, so
        inserting 32 trajectories as one batch costs far less than 32 one-row inserts. An invalid row
        rejects the whole batch before anything is stored (the error names its traj_id and row).
        Idempotent per traj_id: ids stored before, and repeats inside the batch, are skipped.

        Rate limiting splits a batch rather than waiting for room for all of it: new rows are stored
        in runs as large as the limiter (and capacity) allow, waiting between runs. Waiting for the
        whole batch could deadlock: the ratio window may never hold 32 inserts at once. So a batch
        larger than capacity is legal (FIFO: its first rows are evicted by its last), and a timeout
        mid-batch leaves the rows before it stored; retrying the same batch stores just the rest.
        Duplicates never wait.
        """
        if isinstance(item, Trajectory):
            batch = item.unvalidated_record_batch()  # validated once, below
        elif isinstance(item, pa.RecordBatch):
            batch = item
        else:
            raise TypeError(
                f"insert takes a Trajectory or a pyarrow.RecordBatch, not {type(item).__name__}; "
                "use insert_many for a list"
            )
        cols = validate(batch)
        self._check_topk(batch)
        with self._cond:
            return self._add_rows(batch, cols, timeout_s=self._timeout(timeout_s))

    def insert_many(self, items: list[Trajectory | pa.RecordBatch], timeout_s: float | None = None) -> int:
        """Concatenate trajectories and/or batches into one batch and `insert` it (same rules); returns new rows."""
        if not items:
            return 0
        batches = [item.unvalidated_record_batch() if isinstance(item, Trajectory) else item for item in items]
        for i, batch in enumerate(batches):
            if not isinstance(batch, pa.RecordBatch):
                raise TypeError(f"insert_many: item {i} is a {type(batch).__name__}, not a Trajectory or RecordBatch")
            if not batch.schema.equals(SCHEMA):
                validate(batch)  # raises naming the mismatching fields
        return self.insert(batches[0] if len(batches) == 1 else pa.concat_batches(batches), timeout_s)

    def _add_rows(
        self, batch: pa.RecordBatch, cols: Columns, loaded_from: int | None = None, timeout_s: float | None = None
    ) -> int:
        """Store the new rows of a validated batch in runs as long as the rate limiter and capacity allow.

        Inserted rows wait for the limiter and are persisted; rows loaded from a segment do neither.
        """
        loading = loaded_from is not None
        ids = batch.column("traj_id").to_pylist()
        stored = i = 0
        while i < len(ids):
            if not loading:
                what = f"insert of {ids[i]!r}"
                if len(ids) > 1:
                    what += f" (row {i} of a {len(ids)}-row batch; {stored} new rows before it were stored)"
                wait_or_raise(
                    self._cond,
                    lambda i=i: ids[i] in self._seen or self._insert_room() > 0,
                    timeout_s,
                    what,
                    self._limiter.insert_blocked_reason,
                )
            if ids[i] in self._seen:
                self._counts["duplicates"] += 1
                i += 1
                continue
            room = self.config.capacity if loading else min(self._insert_room(), self.config.capacity)
            n = self._run_length(ids, i, room)
            rows = batch if n == len(ids) else batch.slice(i, n)
            self._store_rows(rows, cols.rows(i, i + n), loaded_from if loading else self._persist(rows))
            i += n
            stored += n
            self._cond.notify_all()
        return stored

    def _run_length(self, ids: list[str], start: int, room: int) -> int:
        """Rows from `start` that can be stored together: new ids, no repeats, at most `room`."""
        run = {ids[start]}
        for traj_id in ids[start + 1 : start + room]:
            if traj_id in self._seen or traj_id in run:
                break
            run.add(traj_id)
        return len(run)

    def sample(
        self,
        batch_size: int,
        learner_version: int | None = None,
        timeout_s: float | None = None,
        max_staleness: int | None = None,
        blocks_per_row: int = 1,
    ) -> SampleBatch:
        """Draw `batch_size` blocks by the configured policy, waiting for the rate limiter and for fresh data.

        `max_staleness` overrides the configured bound for this call (an on-policy phase wants a
        tighter one); `learner_version` is required when a bound is set. `blocks_per_row` > 1 draws
        the rows first and then that many steps in each (see `Sampler.sample`).
        """
        min_version = self._min_version_for(
            learner_version, self.config.max_staleness if max_staleness is None else max_staleness
        )
        self._limiter.check_sample_size(batch_size)
        with self._cond:
            self._min_version = min_version
            self._cond.notify_all()  # inserts held back by the ratio may now see that nothing is fresh enough
            wait_or_raise(
                self._cond,
                lambda: self._can_sample(batch_size),
                self._timeout(timeout_s),
                f"sample({batch_size})",
                lambda: self._sample_blocked_reason(batch_size),
            )
            batch = self._sampler.sample(self._store, batch_size, min_version, blocks_per_row)
            self._limiter.sampled += batch_size
            self._cond.notify_all()
        return batch

    def get(self, traj_id: str) -> Trajectory | None:
        with self._cond:
            stored = self._store.get(traj_id)
        return None if stored is None else Trajectory.from_record_batch(stored.batch)

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, traj_id: str) -> bool:
        return traj_id in self._store

    def traj_ids(self) -> list[str]:
        """Every traj_id inserted or loaded so far, evicted ones included (what a resumed rollout skips)."""
        with self._cond:
            return sorted(self._seen)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "size": len(self._store),
                "capacity": self.config.capacity,
                "inserted": self._limiter.inserted,
                "sampled": self._limiter.sampled,
                **self._counts,
                "skipped_segments": self._log.skipped if self._log is not None else 0,
            }

    def state_dict(self) -> dict[str, Any]:
        """What a learner checkpoint saves: the rate-limiter counters and the sampler's RNG."""
        with self._cond:
            return {
                "inserted": self._limiter.inserted,
                "sampled": self._limiter.sampled,
                **self._counts,
                "rng": self._sampler.rng.bit_generator.state,
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self._cond:
            self._limiter.inserted, self._limiter.sampled = int(state["inserted"]), int(state["sampled"])
            self._counts.update({k: int(state[k]) for k in self._counts})
            self._sampler.rng.bit_generator.state = state["rng"]
            self._cond.notify_all()

    def release_inserts(self) -> None:
        """The learner is done sampling: drop the sample-to-insert bound so no rollout stays blocked in insert."""
        with self._cond:
            self._limiter.samples_per_insert = None
            self._cond.notify_all()

    def flush(self) -> None:
        """Seal the open segment so everything inserted so far survives a crash."""
        with self._cond:
            if self._log is not None:
                self._log.seal()
                self._drop_dead_segments()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> ReplayBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _persist(self, rows: pa.RecordBatch) -> int | None:
        return self._log.append(rows) if self._log is not None else None

    def _store_rows(self, rows: pa.RecordBatch, cols: Columns, segment: int | None) -> None:
        for _ in range(len(self._store) + rows.num_rows - self.config.capacity):
            self._store.evict_oldest()
            self._counts["evicted"] += 1
        self._seen.update(row.traj_id for row in self._store.add(rows, cols, segment))
        self._limiter.inserted += rows.num_rows
        if self._log is not None:
            self._drop_dead_segments()

    def _drop_dead_segments(self) -> None:
        oldest = self._store.oldest()
        self._log.delete_sealed_before(oldest.segment if oldest is not None else self._log.open_index)

    def _check_topk(self, batch: pa.RecordBatch) -> None:
        k, present = self.config.topk, batch.column("topk_ids").is_valid().to_numpy(zero_copy_only=False)
        if k == 0 and present.any():
            raise ValueError("field 'topk_ids' is set but BufferConfig.topk=0: set topk to its k, or stop recording it")
        if k > 0:
            if not present.all():
                raise ValueError(f"field 'topk_ids' is missing but BufferConfig.topk={k}")
            k_lengths = np.diff(ragged(ragged(ragged(batch.column("topk_ids"))[1])[1])[0])
            if (k_lengths != k).any():
                raise ValueError(f"field 'topk_ids' holds k={k_lengths[0]} but BufferConfig.topk={k}")

    def _insert_room(self) -> int:
        # The ratio never holds inserts back while nothing stored is fresh enough to sample:
        # the waiting sampler needs exactly those inserts.
        return self._limiter.insert_room(len(self._store)) or (0 if self._has_fresh() else 1)

    def _can_sample(self, batch_size: int) -> bool:
        return self._limiter.can_sample(len(self._store), batch_size) and self._has_fresh()

    def _has_fresh(self) -> bool:
        return bool(self._store.eligible_weights(self._min_version).any())

    def _sample_blocked_reason(self, batch_size: int) -> str:
        if not self._limiter.can_sample(len(self._store), batch_size):
            return self._limiter.sample_blocked_reason(len(self._store))
        return (
            f"all {len(self._store)} stored trajectories have draft_version < {self._min_version} "
            "(max_staleness bound); waiting for fresh rollouts"
        )

    def _min_version_for(self, learner_version: int | None, max_staleness: int | None) -> int | None:
        if max_staleness is None:
            return None
        if learner_version is None:
            raise ValueError(f"max_staleness={max_staleness} is set: pass learner_version to sample()")
        if max_staleness < 0:
            raise ValueError(f"max_staleness={max_staleness} must be >= 0 (or None for no bound)")
        return learner_version - max_staleness

    def _timeout(self, timeout_s: float | None) -> float | None:
        return self.config.timeout_s if timeout_s is None else timeout_s
