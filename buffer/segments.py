"""Persistence: the buffer's rows as sealed Arrow IPC stream segments in one directory.

`seg-000012.arrow` grows insert by insert; sealing closes the stream, fsyncs it, then atomically
writes `seg-000012.done` = {"rows", "bytes", "crc32"}. The marker is the commit point: a crash
mid-write leaves a segment without one, so a reopen loses at most the open segment. Loading
checks size and CRC before parsing, which catches a truncated or bit-flipped file even where
Arrow would happily parse the damaged bytes. A bad segment is skipped with a `SegmentWarning`
naming the file and the fix, never silently and never with a crash.
"""

from __future__ import annotations

import json
import os
import re
import warnings
import zlib
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from draft_opd.buffer.schema import SCHEMA

_NAME = re.compile(r"seg-(\d{6})\.(arrow|done)")


def holds_sealed_segments(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a persisted buffer: at least one sealed segment."""
    path = Path(directory)
    return path.is_dir() and any((m := _NAME.fullmatch(p.name)) and m.group(2) == "done" for p in path.iterdir())


def foreign_files(directory: str | os.PathLike) -> list[str]:
    """Names in `directory` that a buffer did not write (its segments, markers and markers in progress), sorted:
    a directory holding any is something else, and persisting a buffer there would mix the two."""
    path = Path(directory)
    own = re.compile(r"seg-\d{6}\.(arrow|done|tmp)")
    return sorted(p.name for p in path.iterdir() if not own.fullmatch(p.name)) if path.is_dir() else []


class SegmentWarning(UserWarning):
    """A segment on disk could not be loaded and was skipped."""


class SegmentLog:
    """Writes rows into rolling segments and deletes segments once the buffer has evicted them."""

    def __init__(self, directory: str | os.PathLike, segment_rows: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.segment_rows = segment_rows
        on_disk = [int(m.group(1)) for m in map(_NAME.fullmatch, os.listdir(self.directory)) if m]
        self.open_index = max(on_disk, default=-1) + 1  # never reuse a name, even a skipped segment's
        self.sealed: deque[int] = deque()  # loaded or sealed segments, oldest first
        self.skipped = 0
        self._file: pa.NativeFile | None = None
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._rows = 0

    def path(self, index: int, suffix: str) -> Path:
        return self.directory / f"seg-{index:06d}.{suffix}"

    def load(self) -> Iterator[tuple[int, pa.RecordBatch]]:
        """(index, all rows) of every sound sealed segment, oldest first; warns about the rest.

        A segment's one-row batches are concatenated (one copy) so the buffer indexes them in one go.
        """
        indices = sorted({int(m.group(1)) for m in map(_NAME.fullmatch, os.listdir(self.directory)) if m})
        for index in indices:
            batches = self._read_sealed(index)
            if batches is None:
                self.skipped += 1
                continue
            self.sealed.append(index)
            if batches:
                yield index, pa.concat_batches(batches)

    def _read_sealed(self, index: int) -> list[pa.RecordBatch] | None:
        data, marker = self.path(index, "arrow"), self.path(index, "done")
        if not data.exists():
            return self._skip(marker, "is a completion marker without its segment", f"delete {marker.name}")
        fix = f"delete {data.name} (and {marker.name}) to drop its rows, or restore both from a backup"
        if not marker.exists():
            return self._skip(
                data,
                "has no completion marker: the writer stopped before sealing it (crash or kill)",
                f"delete {data.name}; its rows may be incomplete",
            )
        try:
            expected = json.loads(marker.read_text())
            rows, size, crc = int(expected["rows"]), int(expected["bytes"]), int(expected["crc32"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            return self._skip(marker, f"is unreadable ({e})", fix)
        actual_size = data.stat().st_size
        if actual_size != size:
            return self._skip(
                data, f"is truncated or overwritten: {actual_size} bytes on disk, marker says {size}", fix
            )
        with pa.memory_map(str(data)) as source:
            buffer = source.read_buffer()  # zero-copy: the loaded rows keep the mapping alive
        if zlib.crc32(buffer) != crc:
            return self._skip(data, "is corrupt: its CRC32 does not match the marker", fix)
        try:
            reader = pa.ipc.open_stream(buffer)
            batches = list(reader)
        except (pa.ArrowException, OSError) as e:
            return self._skip(data, f"is unreadable as an Arrow IPC stream ({e})", fix)
        if not reader.schema.equals(SCHEMA):
            return self._skip(data, "was written with a different schema", fix)
        if sum(b.num_rows for b in batches) != rows:
            return self._skip(data, f"holds a different row count than its marker ({rows})", fix)
        return batches

    def _skip(self, path: Path, problem: str, fix: str) -> None:
        warnings.warn(f"replay buffer: skipped {path}: it {problem}. Fix: {fix}.", SegmentWarning, stacklevel=2)
        return None

    def append(self, row: pa.RecordBatch) -> int:
        """Write a row; returns the index of the segment holding it (sealed when full)."""
        if self._writer is None:
            self._file = pa.OSFile(str(self.path(self.open_index, "arrow")), "wb")
            self._writer = pa.ipc.new_stream(self._file, SCHEMA)
        self._writer.write_batch(row)
        self._rows += row.num_rows
        index = self.open_index
        if self._rows >= self.segment_rows:
            self.seal()
        return index

    def seal(self) -> None:
        """Make the open segment durable and loadable; no-op when nothing is open."""
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()
        data = self.path(self.open_index, "arrow")
        with open(data, "rb") as f:
            os.fsync(f.fileno())  # the data must be on disk before the marker that vouches for it
            with pa.memory_map(str(data)) as source:
                crc = zlib.crc32(source.read_buffer())
        marker = self.path(self.open_index, "done")
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rows": self._rows, "bytes": data.stat().st_size, "crc32": crc}))
        os.replace(tmp, marker)
        self.sealed.append(self.open_index)
        self.open_index += 1
        self._writer, self._file, self._rows = None, None, 0

    def delete_sealed_before(self, index: int) -> None:
        """Delete sealed segments older than `index`: none of their rows are in the buffer any more."""
        while self.sealed and self.sealed[0] < index:
            old = self.sealed.popleft()
            # marker first: a crash in between leaves an unsealed file, which reopening skips
            self.path(old, "done").unlink(missing_ok=True)
            self.path(old, "arrow").unlink(missing_ok=True)
