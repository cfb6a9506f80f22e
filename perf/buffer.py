"""Replay-buffer throughput next to raw pyarrow on the same record batches.

Why: the buffer sits between every rollout actor and the learner; its overhead over plain Arrow
IPC (validation, dedup, indexing, sealing with fsync + CRC) should stay small. Each row compares:
- insert (persisted, sealed at the end), one trajectory per call, with writing the same one-row
  batches to one IPC stream file;
- insert of INSERT_BATCH trajectories per call (one concatenated batch) with writing the same
  INSERT_BATCH-row batches to one stream;
- reopen (load + CRC check + validation + indexing) with reading the same stream back (a
  zero-copy memory-mapped read_all, which touches no row data: with 32-row batches it is nearly free);
- sample (random blocks with accepted/rejected positions, padded, with masks) with raw pyarrow
  `take` of the same blocks, i.e. the same (trajectory, step) pairs, from the step-level list
  columns draft_tokens / draft_logprobs plus anchors / accept_len (no committed tokens, no masks:
  the buffer delivers more per block than the raw op does).
Positions are draft positions (accepted + rejected proposals). Best of `--repeats` runs.

    python -m draft_opd.perf.buffer [--trajectories 2000] [--out runs/bench-buffer.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from draft_opd.buffer import BufferConfig, ReplayBuffer, Trajectory, validate

PROMPT_LEN, STEPS, BLOCK, VOCAB = 100, 100, 16, 151_000
SAMPLE_BATCH, SAMPLE_CALLS = 256, 200
INSERT_BATCH = 32


def synthetic_trajectory(rng: np.random.Generator, i: int) -> Trajectory:
    """Shaped like a real rollout: block 16, 100 verify steps, ~1000 tokens (mean accept ~8)."""
    n_draft = BLOCK - 1
    accept = np.minimum(rng.geometric(0.1, STEPS) - 1, n_draft)
    committed = rng.integers(0, VOCAB, int((accept + 1).sum()), dtype=np.int32)
    input_ids = np.concatenate([rng.integers(0, VOCAB, PROMPT_LEN, dtype=np.int32), committed])
    anchors = PROMPT_LEN - 1 + np.concatenate([[0], np.cumsum(accept + 1)[:-1]])
    drafts = rng.integers(0, VOCAB, (STEPS, n_draft), dtype=np.int32)
    for step, (a, k) in enumerate(zip(anchors, accept)):
        drafts[step, :k] = input_ids[a + 1 : a + 1 + k]
        if k < n_draft and drafts[step, k] == input_ids[a + 1 + k]:
            drafts[step, k] = (drafts[step, k] + 1) % VOCAB
    return Trajectory(
        traj_id=f"traj-{i}",
        prompt_id=f"prompt-{i}",
        draft_version=0,
        actor_id="bench",
        created_at=time.time(),
        input_ids=input_ids,
        prompt_len=PROMPT_LEN,
        anchors=anchors,
        draft_tokens=drafts,
        accept_len=accept,
        committed_logprobs=-rng.random(len(committed), dtype=np.float32),
        draft_logprobs=-rng.random((STEPS, n_draft), dtype=np.float32),
    )


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    return min(timed(fn) for _ in range(repeats))


def raw_write(batches: list[pa.RecordBatch], path: Path) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, batches[0].schema) as writer:
        for batch in batches:
            writer.write_batch(batch)


def raw_read(path: Path) -> None:
    pa.ipc.open_stream(pa.memory_map(str(path))).read_all()


def raw_take_blocks(steps: dict[str, pa.Array], picks: list[np.ndarray]) -> int:
    """Raw pyarrow gather of the sampled blocks: `take` on step-level columns, one call per sample batch."""
    positions = 0
    for idx in picks:
        indices = pa.array(idx)
        taken = {name: column.take(indices) for name, column in steps.items()}
        positions += len(taken["draft_tokens"].values)
    return positions


def step_columns(batches: list[pa.RecordBatch]) -> dict[str, pa.Array]:
    """The step-level columns of all rows: list<int32> / list<float32> per step, int32 per step."""
    whole = pa.concat_batches(batches)
    return {name: whole.column(name).flatten() for name in ("draft_tokens", "draft_logprobs", "anchors", "accept_len")}


def buffer_insert(batches: list[pa.RecordBatch], config: BufferConfig) -> None:
    for old in Path(config.dir).glob("seg-*"):
        old.unlink()
    with ReplayBuffer(config) as buf:
        for batch in batches:
            buf.insert(batch)


def sample_many(buf: ReplayBuffer) -> tuple[float, int, list[np.ndarray]]:
    """Seconds for SAMPLE_CALLS samples, the draft positions (accepted + rejected) they delivered, and
    the global step index of every sampled block (for the raw op to gather the same blocks)."""
    start = time.perf_counter()
    batches = [buf.sample(SAMPLE_BATCH) for _ in range(SAMPLE_CALLS)]
    seconds = time.perf_counter() - start
    first_step = {}  # traj_id -> index of its first step in step_columns (rows are in traj-i order)
    picks = [
        np.array(
            [
                first_step.setdefault(b.traj_ids[t], int(b.traj_ids[t].split("-")[1]) * STEPS) + s
                for t, s in zip(b.traj_index, b.step)
            ]
        )
        for b in batches
    ]
    return seconds, sum(int(b.n_draft.sum()) for b in batches), picks


def draft_positions(batch: pa.RecordBatch) -> int:
    offsets = batch.column("draft_tokens").values.offsets.to_numpy()
    return int(offsets[-1] - offsets[0])


def row(
    op: str,
    seconds: float,
    trajectories: int | None,
    positions: int,
    raw_op: str,
    raw_seconds: float,
    raw_trajectories: int,
    raw_positions: int,
) -> dict:
    return {
        "op": op,
        "traj_per_s": trajectories / seconds if trajectories else None,
        "positions_per_s": positions / seconds,
        "raw_op": raw_op,
        "raw_traj_per_s": raw_trajectories / raw_seconds if raw_trajectories else None,
        "raw_positions_per_s": raw_positions / raw_seconds,
        "ratio": (positions / seconds) / (raw_positions / raw_seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="runs/bench-buffer.json")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    trajectories = [synthetic_trajectory(rng, i) for i in range(args.trajectories)]
    start = time.perf_counter()
    batches = [t.to_record_batch() for t in trajectories]
    to_batch_s = time.perf_counter() - start
    validate_s = best_of(args.repeats, lambda: [validate(b) for b in batches])
    n, positions = len(batches), sum(draft_positions(b) for b in batches)

    chunks = [pa.concat_batches(batches[i : i + INSERT_BATCH]) for i in range(0, n, INSERT_BATCH)]
    with tempfile.TemporaryDirectory() as tmp:
        raw_path, raw_chunks_path = Path(tmp) / "raw.arrow", Path(tmp) / "raw-chunks.arrow"
        config = BufferConfig(capacity=n, dir=str(Path(tmp) / "buffer"))
        raw_write_s = best_of(args.repeats, lambda: raw_write(batches, raw_path))
        raw_write_chunks_s = best_of(args.repeats, lambda: raw_write(chunks, raw_chunks_path))
        raw_read_s = best_of(args.repeats, lambda: raw_read(raw_path))
        raw_read_chunks_s = best_of(args.repeats, lambda: raw_read(raw_chunks_path))
        insert_s = best_of(args.repeats, lambda: buffer_insert(batches, config))
        reopen_s = best_of(args.repeats, lambda: ReplayBuffer(config))  # segments of one-row batches
        insert_chunks_s = best_of(args.repeats, lambda: buffer_insert(chunks, config))
        reopen_chunks_s = best_of(args.repeats, lambda: ReplayBuffer(config))  # segments of 32-row batches
        buf = ReplayBuffer(config)
        sample_s, sampled_positions, picks = min(sample_many(buf) for _ in range(args.repeats))
    steps = step_columns(batches)
    assert raw_take_blocks(steps, picks) == sampled_positions  # the raw op gathers exactly the sampled blocks
    raw_take_s = best_of(args.repeats, lambda: raw_take_blocks(steps, picks))

    report = {
        "trajectories": n,
        "draft_positions": positions,
        "mib": sum(b.nbytes for b in batches) / 2**20,
        "tokens_per_traj": float(np.mean([len(t.input_ids) for t in trajectories])),
        "block": BLOCK,
        "steps": STEPS,
        "repeats": args.repeats,
        "to_record_batch_traj_per_s": n / to_batch_s,
        "validate_traj_per_s": n / validate_s,
        "sample_items_per_s": SAMPLE_CALLS * SAMPLE_BATCH / sample_s,
        "rows": [
            row("insert (persisted)", insert_s, n, positions, "ipc write", raw_write_s, n, positions),
            row(
                f"insert x{INSERT_BATCH}/call",
                insert_chunks_s,
                n,
                positions,
                f"ipc write x{INSERT_BATCH}",
                raw_write_chunks_s,
                n,
                positions,
            ),
            row("reopen (load)", reopen_s, n, positions, "ipc read", raw_read_s, n, positions),
            row(
                f"reopen x{INSERT_BATCH} segs",
                reopen_chunks_s,
                n,
                positions,
                f"ipc read x{INSERT_BATCH}",
                raw_read_chunks_s,
                n,
                positions,
            ),
            row(
                f"sample (batch {SAMPLE_BATCH})",
                sample_s,
                None,
                sampled_positions,
                "take blocks",
                raw_take_s,
                0,
                sampled_positions,
            ),
        ],
    }
    print_table(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"saved {out}")


def print_table(report: dict) -> None:
    print(
        f"{report['trajectories']} trajectories, {report['mib']:.1f} MiB, ~{report['tokens_per_traj']:.0f} tokens, "
        f"block {report['block']}, {report['steps']} steps, best of {report['repeats']}"
    )
    print(
        f"Trajectory.to_record_batch {report['to_record_batch_traj_per_s']:.0f} traj/s, "
        f"validate alone {report['validate_traj_per_s']:.0f} traj/s, "
        f"sample {report['sample_items_per_s']:.0f} items/s"
    )
    header = (
        f"{'buffer op':<20}{'traj/s':>10}{'positions/s':>14}   "
        f"{'raw pyarrow':<14}{'traj/s':>10}{'positions/s':>14}{'ratio':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in report["rows"]:
        traj = f"{r['traj_per_s']:.0f}" if r["traj_per_s"] is not None else "-"
        raw_traj = f"{r['raw_traj_per_s']:.0f}" if r["raw_traj_per_s"] is not None else "-"
        print(
            f"{r['op']:<20}{traj:>10}{r['positions_per_s']:>14.3g}   {r['raw_op']:<14}{raw_traj:>10}"
            f"{r['raw_positions_per_s']:>14.3g}{r['ratio']:>8.2f}"
        )


if __name__ == "__main__":
    main()
