"""In-memory FIFO of trajectories: the Arrow rows plus a flat numpy index that sampling gathers from.

Why two representations: the Arrow rows are the source of truth (persistence, `get`, zero-copy
input_ids and features for the learner), but gathering random (trajectory, step) blocks from
thousands of one-row batches would cost a Python loop per item. The index copies the columns
sampling reads (tokens, committed log-probs, draft tokens and log-probs, top-k) into contiguous
arrays addressed by ever-increasing coordinates, so a sample is a few vectorized gathers, and
FIFO eviction only advances a start coordinate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from draft_opd.buffer.schema import Columns, diff, features_view, numpy


class FifoTable:
    """Equal-length numpy columns addressed by global coordinates; the live rows are [start, end).

    Dropped rows stay allocated until the next growth copies only the live ones, so the cost of
    eviction is amortized into appends.
    """

    def __init__(self, **columns: np.dtype | tuple[np.dtype, int]):
        self._data = {name: _empty(spec, 1024) for name, spec in columns.items()}
        self._specs = columns
        self._base = 0  # coordinate of row 0 of every array
        self.start = 0
        self.end = 0

    def append(self, **values: np.ndarray) -> int:
        n = len(next(iter(values.values())))
        if self.end + n - self._base > len(next(iter(self._data.values()))):
            self._grow(n)
        lo = self.end - self._base
        for name, value in values.items():
            self._data[name][lo : lo + n] = value
        first, self.end = self.end, self.end + n
        return first

    def drop_before(self, coord: int) -> None:
        self.start = coord

    def take(self, name: str, coords: np.ndarray) -> np.ndarray:
        return self._data[name][coords - self._base]

    def live(self, name: str) -> np.ndarray:
        return self._data[name][self.start - self._base : self.end - self._base]

    def _grow(self, extra: int) -> None:
        rows = 2 * (self.end - self.start + extra)
        for name, spec in self._specs.items():
            data = _empty(spec, rows)
            data[: self.end - self.start] = self.live(name)
            self._data[name] = data
        self._base = self.start


def _empty(spec: np.dtype | tuple[np.dtype, int], rows: int) -> np.ndarray:
    dtype, width = spec if isinstance(spec, tuple) else (spec, None)
    return np.empty((rows,) if width is None else (rows, width), dtype=dtype)


@dataclass(frozen=True)
class StoredRow:
    batch: pa.RecordBatch  # the one-row batch as inserted
    traj_id: str
    input_ids: np.ndarray  # zero-copy view of the batch
    features: np.ndarray | None
    segment: int | None  # persistence segment holding the row; None when in-memory only


class TrajectoryStore:
    """Rows in insertion order, each addressed by a serial number (its coordinate in `rows`)."""

    def __init__(self, topk: int, step_weight: Callable[[np.ndarray, np.ndarray], np.ndarray]):
        self.topk = topk
        self.step_weight = step_weight  # (accept_len, n_draft) -> positive int64 weight per step
        self._rows: dict[int, StoredRow] = {}
        self._serial_of: dict[str, int] = {}
        self._weight_total = 0
        self.rows = FifoTable(
            step0=np.int64,
            n_steps=np.int64,
            tok0=np.int64,
            length=np.int64,
            n_draft=np.int64,
            prompt_len=np.int64,
            version=np.int64,
            weight=np.int64,
            weight0=np.int64,
        )
        self.steps = FifoTable(anchor=np.int64, accept=np.int64, n_draft=np.int64, draft0=np.int64, cum_weight=np.int64)
        self.tokens = FifoTable(token=np.int32, logprob=np.float32)
        topk_columns = {"topk_ids": (np.int32, topk), "topk_logprobs": (np.float32, topk)} if topk else {}
        self.drafts = FifoTable(token=np.int32, logprob=np.float32, **topk_columns)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, traj_id: str) -> bool:
        return traj_id in self._serial_of

    def row(self, serial: int) -> StoredRow:
        return self._rows[serial]

    def get(self, traj_id: str) -> StoredRow | None:
        serial = self._serial_of.get(traj_id)
        return None if serial is None else self._rows[serial]

    def oldest(self) -> StoredRow | None:
        return self._rows.get(self.rows.start)

    def add(self, batch: pa.RecordBatch, cols: Columns, segment: int | None) -> list[StoredRow]:
        """Index every row of a validated batch in a few vectorized appends."""
        committed = np.full(len(cols.input_ids), np.nan, dtype=np.float32)  # NaN under each prompt
        first_response = cols.token_offsets[:-1] + cols.prompt_len
        if batch.num_rows == 1:
            committed[first_response[0] :] = cols.committed_logprobs
        else:  # each row's response is the tail of its tokens, and committed_logprobs lists exactly those
            n_response = diff(cols.committed_offsets)
            committed[
                np.repeat(first_response - cols.committed_offsets[:-1], n_response)
                + np.arange(len(cols.committed_logprobs))
            ] = cols.committed_logprobs
        n_draft = diff(cols.draft_offsets)
        weight = self.step_weight(cols.accept_len, n_draft)
        cum_weight = np.concatenate([[0], np.cumsum(weight)])
        first, last = cols.step_offsets[:-1], cols.step_offsets[1:]

        drafts = {"token": cols.draft_tokens, "logprob": cols.draft_logprobs}
        if self.topk:
            for name in ("topk_ids", "topk_logprobs"):
                drafts[name] = numpy(batch.column(name).flatten().flatten().flatten()).reshape(-1, self.topk)
        draft0 = self.drafts.append(**drafts)
        tok0 = self.tokens.append(token=cols.input_ids, logprob=committed)
        step0 = self.steps.append(
            anchor=cols.anchors,
            accept=cols.accept_len,
            n_draft=n_draft,
            draft0=draft0 + cols.draft_offsets[:-1],
            cum_weight=self._weight_total + cum_weight[1:],
        )
        serial0 = self.rows.append(
            step0=step0 + first,
            n_steps=last - first,
            tok0=tok0 + cols.token_offsets[:-1],
            length=diff(cols.token_offsets),
            n_draft=cols.draft_offsets[last] - cols.draft_offsets[first],
            prompt_len=cols.prompt_len,
            version=cols.draft_version,
            weight=cum_weight[last] - cum_weight[first],
            weight0=self._weight_total + cum_weight[first],
        )
        self._weight_total += int(cum_weight[-1])

        stored = []
        one_row = batch.num_rows == 1
        has_features = batch.column("features").null_count < batch.num_rows
        offsets = cols.token_offsets.tolist()
        for i, traj_id in enumerate(batch.column("traj_id").to_pylist()):
            row = StoredRow(
                batch if one_row else batch.slice(i, 1),
                traj_id,
                cols.input_ids[offsets[i] : offsets[i + 1]],
                features_view(batch, i) if has_features else None,
                segment,
            )
            stored.append(row)
            self._rows[serial0 + i] = row
            self._serial_of[traj_id] = serial0 + i
        return stored

    def evict_oldest(self) -> StoredRow:
        serial = self.rows.start
        stored = self._rows.pop(serial)
        del self._serial_of[stored.traj_id]
        coord = np.array([serial])
        self.steps.drop_before(self.steps.start + int(self.rows.take("n_steps", coord)[0]))
        self.tokens.drop_before(self.tokens.start + int(self.rows.take("length", coord)[0]))
        self.drafts.drop_before(self.drafts.start + int(self.rows.take("n_draft", coord)[0]))
        self.rows.drop_before(serial + 1)
        return stored

    def eligible_weights(self, min_version: int | None) -> np.ndarray:
        """Sampling weight of each live row (in serial order); 0 where the row is too stale."""
        weight = self.rows.live("weight")
        if min_version is None:
            return weight
        return np.where(self.rows.live("version") >= min_version, weight, 0)
