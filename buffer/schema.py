"""One trajectory = one Arrow row. The schema, the `Trajectory` the rollout side fills, and the
checks every row passes before the buffer stores it.

Layout choices:
- per verify step (S steps) the row holds lists of length S: `anchors`, `accept_len`, and the
  ragged `draft_tokens` / `draft_logprobs` (list<list<...>>, the last block may be shorter);
- top-k teacher data is list<list<list<...>>> [S][proposals][k], null when not recorded;
- target features are raw little-endian float16 bytes, row-major [len(input_ids), feature_dim],
  in a large_binary column (64-bit offsets: long rows times a wide F overflow 2 GiB quickly),
  so reading them back is a zero-copy `np.frombuffer`; both columns are null when not stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SCHEMA = pa.schema(
    [
        ("traj_id", pa.string()),
        ("prompt_id", pa.string()),
        ("draft_version", pa.int64()),
        ("actor_id", pa.string()),
        ("created_at", pa.float64()),
        ("input_ids", pa.list_(pa.int32())),
        ("prompt_len", pa.int32()),
        ("anchors", pa.list_(pa.int32())),
        ("draft_tokens", pa.list_(pa.list_(pa.int32()))),
        ("accept_len", pa.list_(pa.int32())),
        ("committed_logprobs", pa.list_(pa.float32())),
        ("draft_logprobs", pa.list_(pa.list_(pa.float32()))),
        ("topk_ids", pa.list_(pa.list_(pa.list_(pa.int32())))),
        ("topk_logprobs", pa.list_(pa.list_(pa.list_(pa.float32())))),
        ("features", pa.large_binary()),
        ("feature_dim", pa.int32()),
    ]
)


@dataclass(eq=False)  # `features` is an array, so compare fields explicitly
class Trajectory:
    """One rollout of one prompt. Sequence fields take lists or numpy arrays.

    Step i's block starts at input_ids[anchors[i]] (the last committed token); its proposals
    are draft_tokens[i]; the first accept_len[i] of them equal input_ids[anchor+1 : ...], and
    the target's bonus token follows them.
    """

    traj_id: str
    prompt_id: str
    draft_version: int
    actor_id: str
    created_at: float
    input_ids: list[int]
    prompt_len: int
    anchors: list[int]
    draft_tokens: list[list[int]]
    accept_len: list[int]
    committed_logprobs: list[float]
    draft_logprobs: list[list[float]]
    topk_ids: list[list[list[int]]] | None = None
    topk_logprobs: list[list[list[float]]] | None = None
    features: np.ndarray | None = None  # float16 [len(input_ids), F]

    def to_record_batch(self) -> pa.RecordBatch:
        """A validated one-row batch: what `ReplayBuffer.insert` stores (and cheap to send to a Ray actor)."""
        batch = self.unvalidated_record_batch()
        validate(batch)
        return batch

    def unvalidated_record_batch(self) -> pa.RecordBatch:
        """The one-row batch with only the type conversions checked; `validate` it (alone or concatenated
        with others) before storing it. `ReplayBuffer.insert` / `insert_many` do, once per call."""
        columns = {}
        for field in SCHEMA:
            if field.name in ("features", "feature_dim"):
                continue
            value = getattr(self, field.name)
            try:
                if value is None or not pa.types.is_list(field.type):
                    columns[field.name] = pa.array([value], type=field.type)
                else:
                    columns[field.name] = _list_array(value, field.type)
            except (pa.ArrowException, TypeError, ValueError) as e:
                raise ValueError(
                    f"trajectory {self.traj_id!r}: field '{field.name}' cannot be stored as {field.type}: {e}"
                ) from e
        columns["features"], columns["feature_dim"] = _features_columns(self.traj_id, self.features)
        return pa.RecordBatch.from_arrays(list(columns.values()), schema=SCHEMA)

    @classmethod
    def from_record_batch(cls, batch: pa.RecordBatch, row: int = 0) -> Trajectory:
        """Python lists for the sequences; `features` is a read-only zero-copy view of the batch."""
        names = [name for name in SCHEMA.names if name not in ("features", "feature_dim")]
        values = {name: batch.column(name)[row].as_py() for name in names}
        return cls(**values, features=features_view(batch, row))


def features_view(batch: pa.RecordBatch, row: int) -> np.ndarray | None:
    blob = batch.column("features")[row]
    if not blob.is_valid:
        return None
    dim = batch.column("feature_dim")[row].as_py()
    return np.frombuffer(blob.as_buffer(), dtype="<f2").reshape(-1, dim)


def _list_array(value, type: pa.DataType) -> pa.Array:
    """A one-row list array from nested lists or numpy arrays of any shape (pa.array rejects 2-D ones)."""
    levels, items = [], [value]
    while pa.types.is_list(type):
        levels.append(np.cumsum([0] + [len(x) for x in items]))
        type = type.value_type
        if pa.types.is_list(type):
            items = [y for x in items for y in x]
    leaves = [np.asarray(x) for x in items]
    if any(leaf.ndim != 1 for leaf in leaves):
        raise ValueError("nested one level too deep")
    flat = np.concatenate(leaves) if leaves else np.empty(0)
    array = pa.array(flat).cast(type)  # a safe cast: refuses to truncate floats or overflow int32
    for offsets in reversed(levels):
        array = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), array)
    return array


def _features_columns(traj_id: str, features: np.ndarray | None) -> tuple[pa.Array, pa.Array]:
    if features is None:
        return pa.nulls(1, pa.large_binary()), pa.nulls(1, pa.int32())
    if not isinstance(features, np.ndarray) or features.dtype != np.float16 or features.ndim != 2:
        raise ValueError(f"trajectory {traj_id!r}: field 'features' must be a float16 numpy array [len(input_ids), F]")
    data = pa.py_buffer(np.ascontiguousarray(features, dtype="<f2"))
    offsets = pa.py_buffer(np.array([0, data.size], dtype=np.int64))
    blob = pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, data])
    return blob, pa.array([features.shape[1]], pa.int32())


def ragged(arr: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """(int64 offsets rebased to 0, child values) of a list array, zero-copy; works on slices."""
    offsets = arr.offsets.to_numpy().astype(np.int64)
    first, values = int(offsets[0]), arr.values
    if first == 0 and offsets[-1] == len(values):  # not a slice: skip the rebase and the child slice
        return offsets, values
    return offsets - first, values.slice(first, int(offsets[-1]) - first)


def diff(x: np.ndarray) -> np.ndarray:
    """np.diff of a 1-D array without its per-call overhead (this runs a dozen times per insert)."""
    return x[1:] - x[:-1]


def numpy(arr: pa.Array) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False)


@dataclass(frozen=True)
class Columns:
    """A batch's numeric columns as numpy, unpacked once and shared by validation and indexing.

    Offsets start at 0: row r owns input_ids[token_offsets[r]:token_offsets[r+1]] and steps
    step_offsets[r]:step_offsets[r+1]; step s owns proposals draft_offsets[s]:draft_offsets[s+1].
    committed_logprobs follows input_ids minus each row's prompt.
    """

    prompt_len: np.ndarray
    draft_version: np.ndarray
    token_offsets: np.ndarray
    input_ids: np.ndarray
    committed_offsets: np.ndarray
    committed_logprobs: np.ndarray
    step_offsets: np.ndarray
    anchors: np.ndarray
    accept_len: np.ndarray
    draft_offsets: np.ndarray
    draft_tokens: np.ndarray
    draft_logprobs: np.ndarray

    def rows(self, lo: int, hi: int) -> Columns:
        """The columns of rows [lo, hi), still zero-copy."""
        if lo == 0 and hi == len(self.prompt_len):
            return self
        tokens, committed = self.token_offsets[lo : hi + 1], self.committed_offsets[lo : hi + 1]
        steps = self.step_offsets[lo : hi + 1]
        drafts = self.draft_offsets[steps[0] : steps[-1] + 1]
        return Columns(
            self.prompt_len[lo:hi],
            self.draft_version[lo:hi],
            tokens - tokens[0],
            self.input_ids[tokens[0] : tokens[-1]],
            committed - committed[0],
            self.committed_logprobs[committed[0] : committed[-1]],
            steps - steps[0],
            self.anchors[steps[0] : steps[-1]],
            self.accept_len[steps[0] : steps[-1]],
            drafts - drafts[0],
            self.draft_tokens[drafts[0] : drafts[-1]],
            self.draft_logprobs[drafts[0] : drafts[-1]],
        )


class _Checker:
    """Turns a failed vectorized check into a ValueError naming the trajectory, step and field."""

    def __init__(self, batch: pa.RecordBatch):
        self.batch = batch
        self.step_offsets = np.zeros(batch.num_rows + 1, dtype=np.int64)

    def rows(self, ok: np.ndarray, field: str, rule: str) -> None:
        if not ok.all():
            row = int(np.argmin(ok))
            raise ValueError(f"{self._where(row)}: field '{field}' {rule}")

    def steps(self, ok: np.ndarray, field: str, rule: str) -> None:
        if not ok.all():
            step = int(np.argmin(ok))
            row = int(np.searchsorted(self.step_offsets, step, side="right") - 1)
            raise ValueError(f"{self._where(row)}, step {step - self.step_offsets[row]}: field '{field}' {rule}")

    def lists(self, name: str, depth: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Offsets of each nesting level and the leaf values of a required list column; no nulls anywhere."""
        arr, levels = self.batch.column(name), []
        for _ in range(depth):
            if arr.null_count:
                raise ValueError(f"field '{name}' holds a null (required, and nulls are not allowed inside it)")
            offsets, arr = ragged(arr)
            levels.append(offsets)
        if arr.null_count:
            raise ValueError(f"field '{name}' holds a null (required, and nulls are not allowed inside it)")
        return levels, numpy(arr)

    def _where(self, row: int) -> str:
        return f"trajectory {self.batch.column('traj_id')[row].as_py()!r} (row {row})"


def validate(batch: pa.RecordBatch) -> Columns:
    """Raise ValueError naming the first bad field (vectorized over all rows); return the unpacked columns."""
    if not batch.schema.equals(SCHEMA):
        wrong = [
            f"'{f.name}' should be {f.type}"
            for f in SCHEMA
            if f.name not in batch.schema.names or batch.schema.field(f.name).type != f.type
        ]
        raise ValueError(
            f"record batch schema differs from buffer.SCHEMA ({'; '.join(wrong) or 'field order'}); "
            "build rows with Trajectory.to_record_batch()"
        )
    for name in ("traj_id", "prompt_id", "draft_version", "actor_id", "created_at", "prompt_len"):
        if batch.column(name).null_count:
            raise ValueError(f"field '{name}' holds a null (required)")
    check = _Checker(batch)
    (tok_off,), tokens = check.lists("input_ids", 1)
    (step_off,), anchors = check.lists("anchors", 1)
    check.step_offsets = step_off
    (lp_off,), committed = check.lists("committed_logprobs", 1)
    (acc_off,), accept = check.lists("accept_len", 1)
    (dstep_off, draft_off), draft_tokens = check.lists("draft_tokens", 2)
    (lstep_off, dlp_off), draft_logprobs = check.lists("draft_logprobs", 2)
    length = diff(tok_off)
    prompt_len = numpy(batch.column("prompt_len")).astype(np.int64)
    check.rows((prompt_len >= 1) & (prompt_len <= length), "prompt_len", "must be in 1..len(input_ids)")
    check.rows(
        diff(lp_off) == length - prompt_len,
        "committed_logprobs",
        "must hold one log-prob per response token (len(input_ids) - prompt_len)",
    )
    n_steps = diff(step_off)
    for name, offsets in (("accept_len", acc_off), ("draft_tokens", dstep_off), ("draft_logprobs", lstep_off)):
        check.rows(diff(offsets) == n_steps, name, "must have one entry per verify step (len(anchors))")
    n_draft = diff(draft_off)
    check.steps(diff(dlp_off) == n_draft, "draft_logprobs", "must have one log-prob per draft token")
    check.steps((accept >= 0) & (accept <= n_draft), "accept_len", "must be in 0..len(draft_tokens[step])")
    anchors = anchors.astype(np.int64)  # int32 anchors + accept_len could wrap around past the bound below
    step_row = np.repeat(np.arange(batch.num_rows), n_steps)
    row_len = length[step_row]
    check.steps(
        (anchors >= prompt_len[step_row] - 1) & (anchors + accept < row_len),
        "anchors",
        "must lie in [prompt_len-1, len(input_ids)-accept_len-1): the accepted tokens follow the anchor",
    )
    check.steps(
        _drafts_agree(
            tokens, tok_off[step_row] + anchors + 1, row_len - anchors - 1, accept, n_draft, draft_off, draft_tokens
        ),
        "draft_tokens",
        "disagrees with input_ids: accepted proposals must equal input_ids[anchor+1+j] and the first "
        "rejected one must differ from it (anchors or accept_len off by one?)",
    )
    _validate_topk(batch, check, n_steps, n_draft)
    _validate_features(batch, check, length)
    return Columns(
        prompt_len,
        numpy(batch.column("draft_version")),
        tok_off,
        tokens,
        lp_off,
        committed,
        step_off,
        anchors,
        accept,
        draft_off,
        draft_tokens,
        draft_logprobs,
    )


def _drafts_agree(
    tokens: np.ndarray,
    start: np.ndarray,
    room: np.ndarray,
    accept: np.ndarray,
    n_draft: np.ndarray,
    draft_off: np.ndarray,
    draft_tokens: np.ndarray,
) -> np.ndarray:
    """Per step: proposal j sits at input_ids position anchor+1+j (flat index start+j, `room` positions
    left in its row). Accepted ones (j < accept_len) must equal the committed token there, and the
    first rejected one (j = accept_len, when inside the row) must differ from it: it is the target's
    bonus token. Needs the anchors check first, which keeps every accepted position inside its row."""
    ok = np.ones(len(accept), dtype=bool)
    bonus = np.flatnonzero((accept < n_draft) & (accept < room))
    if len(bonus):
        ok[bonus] = draft_tokens[draft_off[bonus] + accept[bonus]] != tokens[start[bonus] + accept[bonus]]
    if not len(accept):
        return ok
    n = int(n_draft[0])
    if n and (n_draft == n).all():  # the usual fixed block size: one [steps, n] window per step, no gathers
        padded = np.concatenate([tokens, np.zeros(n, tokens.dtype)])  # windows may run past the last row
        window = np.lib.stride_tricks.sliding_window_view(padded, n)[start]  # input_ids[start:start+n] per step
        wrong = (draft_tokens.reshape(-1, n) != window) & (np.arange(n) < accept[:, None])
        return ok & ~wrong.any(axis=1)
    step = np.repeat(np.arange(len(accept)), accept)  # one entry per accepted proposal
    first = np.cumsum(accept) - accept
    j = np.arange(len(step)) - first[step]
    wrong = draft_tokens[draft_off[step] + j] != tokens[start[step] + j]
    return ok & (np.bincount(step[wrong], minlength=len(accept)) == 0)


def _optional_pair(batch: pa.RecordBatch, check: _Checker, lead: str, partner: str) -> np.ndarray | None:
    """Rows where the optional column `lead` is present (None if in none); `partner` must be present with it."""
    a, b = batch.column(lead), batch.column(partner)
    if a.null_count == b.null_count == len(a):
        return None
    present = a.is_valid().to_numpy(zero_copy_only=False)
    check.rows(present == b.is_valid().to_numpy(zero_copy_only=False), partner, f"must be given exactly when {lead} is")
    return present


def _validate_topk(batch: pa.RecordBatch, check: _Checker, n_steps: np.ndarray, n_draft: np.ndarray) -> None:
    present = _optional_pair(batch, check, "topk_ids", "topk_logprobs")
    if present is None:
        return
    ids, logprobs = batch.column("topk_ids"), batch.column("topk_logprobs")
    outer_off, steps = ragged(ids)
    check.rows(
        np.where(present, diff(outer_off), n_steps) == n_steps, "topk_ids", "must have one entry per verify step"
    )
    has_steps = np.repeat(present, n_steps)
    mid_off, positions = ragged(steps)
    ok = np.ones(len(n_draft), dtype=bool)
    ok[has_steps] = diff(mid_off) == n_draft[has_steps]
    check.steps(ok, "topk_ids", "must have one top-k list per draft token")
    k_lengths = diff(ragged(positions)[0])
    if len(k_lengths) and (k_lengths != k_lengths[0]).any():
        raise ValueError("field 'topk_ids' must hold the same k at every draft position")
    for level_ids, level_lp in zip(_offset_levels(ids), _offset_levels(logprobs)):
        if not np.array_equal(level_ids, level_lp):
            raise ValueError("field 'topk_logprobs' must have the same shape as topk_ids")


def _offset_levels(arr: pa.Array) -> list[np.ndarray]:
    levels = []
    while pa.types.is_list(arr.type):
        offsets, arr = ragged(arr)
        levels.append(offsets)
    return levels


def _validate_features(batch: pa.RecordBatch, check: _Checker, length: np.ndarray) -> None:
    present = _optional_pair(batch, check, "features", "feature_dim")
    if present is None:
        return
    blobs, dims = batch.column("features"), batch.column("feature_dim")
    size = pc.binary_length(blobs).fill_null(0).to_numpy()
    dim = dims.fill_null(0).to_numpy().astype(np.int64)
    check.rows(~present | (dim > 0), "feature_dim", "must be positive")
    check.rows(
        ~present | (size == length * dim * 2),
        "features",
        "must be float16 [len(input_ids), feature_dim] (byte size mismatch)",
    )
