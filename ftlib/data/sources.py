"""Where the rows come from, and which of them shard i of N reads.

All sources together form one sequence of rows: sources in recipe order, each source's files in sorted order, each
file's rows in file order. Shard i of N takes the i-th of N contiguous pieces of that sequence, so putting the shards
back together in index order gives the same rows in the same order for any N.

The pieces are cut by weight (about the bytes of text), each file owning an interval of the whole. Positions inside a
file are byte offsets of line starts for JSON Lines, so a shard seeks straight to its part of a plain .jsonl file and
reads nothing else (a line belongs to the shard whose range holds its first byte). A gzip file cannot be seeked: its
shards decompress from the start, skipping to their part without parsing, and its size is the gzip trailer's estimate
(lines past it go to the shard that owns the end of the file). JSON arrays, Parquet and saved data sets are cut by
row index; Parquet shards read only the row groups they need, saved data sets are memory-mapped, but a JSON array is
parsed whole by every shard (use JSON Lines for big inputs).
"""
from __future__ import annotations

import codecs
import glob
import gzip
import json
import os
import struct
from dataclasses import dataclass, replace
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ftlib.data import DataError

INFINITY = float("inf")


@dataclass(frozen=True)
class InputFile:
    source: int               # index into recipe.data.sources
    path: str                 # a file, a saved-dataset directory, or a hub data set name
    kind: str                 # lines (JSON Lines), array (one JSON array), parquet, dataset (saved or hub)
    size: int                 # extent in positions: bytes for `lines` (uncompressed for gzip), rows otherwise
    weight: int               # share of the work, about the bytes of text; sets the shard boundaries
    exact: bool = True        # False when `size` is an estimate (gzip): lines past it belong to the last part
    compressed: bool = False
    split: str = "train"


@dataclass(frozen=True)
class Part:
    file: InputFile
    lo: int                   # first position (inclusive)
    hi: float                 # end position (exclusive); INFINITY for the last part of an inexact file
    share: float              # fraction of this shard's weight, for progress lines


class InvalidJSON:
    """Stands for a line that did not parse; the reader yields it in place of the row."""

    def __init__(self, detail: str):
        self.detail = detail


# ----------------------------------------------------------------------------------------------------- planning
def list_files(recipe) -> List[InputFile]:
    """Every input file of the recipe in global order, with data.sources[].max_rows applied."""
    files: List[InputFile] = []
    for i, source in enumerate(recipe.data.sources):
        found = _source_files(i, source)
        if source.max_rows is not None:
            found = _first_rows(found, source.max_rows)
        files += found
    return files


def shard_parts(files: List[InputFile], index: int, num_shards: int) -> List[Part]:
    """The parts of `files` that shard `index` of `num_shards` reads.

    A row at position p of file f lies at the point (W_f + w_f * p / s_f) / W of the whole (W_f: weight of the files
    before f, w_f its weight, s_f its size, W the total weight) and belongs to shard floor(N * point). Integer
    arithmetic, so every shard agrees on every boundary."""
    if not 0 <= index < num_shards:
        raise DataError(f"shard index {index} is not in 0..{num_shards - 1}")
    total = sum(f.weight for f in files)
    parts, before = [], 0
    mine = [(index * total) / num_shards, ((index + 1) * total) / num_shards]
    for f in files:
        def boundary(i: int) -> int:
            p = -(-((i * total - num_shards * before) * f.size) // (num_shards * f.weight))  # ceil division
            return min(max(p, 0), f.size)

        lo, hi = boundary(index), boundary(index + 1)
        if lo < hi:
            overlap = min(mine[1], before + f.weight) - max(mine[0], before)
            end = INFINITY if (hi == f.size and not f.exact) else hi
            parts.append(Part(f, lo, end, share=max(overlap, 0) / max(mine[1] - mine[0], 1e-9)))
        before += f.weight
    return parts


def _source_files(i: int, source) -> List[InputFile]:
    path = source.path
    if not os.path.isabs(path):  # the recipe made every local path absolute: this is a hub name
        ds = _dataset(path, source.split, hub=True, where=f"data.sources[{i}]")
        return [InputFile(i, path, "dataset", len(ds), max(ds.data.nbytes, 1), split=source.split)]
    matches = sorted(glob.glob(path)) if any(ch in path for ch in "*?[") else [path]
    if not matches or not all(os.path.exists(m) for m in matches):
        raise DataError(f"data.sources[{i}].path: no file matches {path}")
    files = []
    for m in matches:
        f = _describe(i, m, source.split)
        if f is not None:
            files.append(f)
    return files


def _describe(i: int, path: str, split: str) -> Optional[InputFile]:
    if os.path.isdir(path):
        if not _is_saved_dataset(path):
            raise DataError(f"{path}: a directory, but not one saved with datasets' save_to_disk "
                            f"(for a folder of files use a glob such as {os.path.join(path, '*.jsonl')})")
        ds = _dataset(path, split, hub=False, where=path)
        weight = sum(os.path.getsize(c["filename"]) for c in ds.cache_files) or 1
        return InputFile(i, path, "dataset", len(ds), weight, split=split)
    name = path.lower()
    compressed = name.endswith(".gz")
    base = name[:-3] if compressed else name
    if os.path.getsize(path) == 0:
        return None
    if base.endswith(".parquet") and not compressed:
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        if meta.num_rows == 0:
            return None
        nbytes = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
        return InputFile(i, path, "parquet", meta.num_rows, max(nbytes, 1))
    if not base.endswith((".jsonl", ".ndjson", ".json")):
        raise DataError(f"{path}: unsupported file type (expected .jsonl, .json or .parquet; JSON may be .gz)")
    if base.endswith(".json") and _first_char(path, compressed) == b"[":
        rows = _json_array(path, compressed)
        if not rows:
            return None
        nbytes = _uncompressed_size(path) if compressed else os.path.getsize(path)
        return InputFile(i, path, "array", len(rows), max(nbytes, 1), compressed=compressed)
    if compressed:
        size = max(_uncompressed_size(path), 1)
        return InputFile(i, path, "lines", size, size, exact=False, compressed=True)
    size = os.path.getsize(path)
    return InputFile(i, path, "lines", size, size)


def _first_rows(files: List[InputFile], max_rows: int) -> List[InputFile]:
    """The files cut down to the source's first `max_rows` rows (JSON Lines files are scanned up to there)."""
    out, left = [], max_rows
    for f in files:
        if left <= 0:
            break
        if f.kind == "lines":
            count, end = 0, 0
            for pos, _, line in _lines(f, 0, INFINITY, parse=False):
                count, end = count + 1, pos + len(line)
                if count == left:
                    break
            if count == 0:
                continue
            out.append(replace(f, size=end, weight=end, exact=True))
        else:
            count = min(f.size, left)
            out.append(replace(f, size=count, weight=max(f.weight * count // f.size, 1)))
        left -= count
    return out


# ----------------------------------------------------------------------------------------------------- reading
Row = Tuple[int, Optional[int], Any]  # (position, line number if known, parsed row or InvalidJSON)


def read_part(part: Part) -> Iterator[Row]:
    """The rows of one part, in order."""
    f = part.file
    if f.kind == "lines":
        yield from _lines(f, part.lo, part.hi, parse=True)
    elif f.kind == "array":
        rows = _json_array(f.path, f.compressed)
        for p in range(part.lo, int(min(part.hi, f.size))):
            yield p, None, rows[p]
    elif f.kind == "parquet":
        yield from _parquet_rows(f.path, part.lo, int(part.hi))
    else:
        ds = _dataset(f.path, f.split, hub=not os.path.isabs(f.path), where=f.path)
        p = part.lo
        for batch in ds.select(range(part.lo, int(part.hi))).iter(batch_size=1000):
            for values in zip(*batch.values()):
                yield p, None, dict(zip(batch.keys(), values))
                p += 1


def _lines(f: InputFile, lo: int, hi: float, parse: bool) -> Iterator[Row]:
    """Non-blank lines whose first byte is in [lo, hi), with their positions (and line numbers when cheap)."""
    if f.compressed:
        with gzip.open(f.path, "rb") as stream:
            pos = 0
            for number, line in enumerate(stream, 1):
                if pos >= hi:
                    break
                if pos >= lo and line.strip():
                    yield pos, number, (_parse(line) if parse else line)
                pos += len(line)
        return
    with open(f.path, "rb") as stream:
        pos = lo
        if lo > 0:  # skip the line that started before our range: it belongs to the previous shard
            stream.seek(lo - 1)
            pos = lo - 1 + len(stream.readline())
        for line in stream:
            if pos >= hi:
                break
            if line.strip():
                yield pos, None, (_parse(line) if parse else line)
            pos += len(line)


def _parse(line: bytes) -> Any:
    try:
        # Decoding first spares json its encoding detection on every line.
        return json.loads((line[3:] if line.startswith(codecs.BOM_UTF8) else line).decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return InvalidJSON(str(e).split(":")[0] if "line 1 column" in str(e) else str(e))


def _parquet_rows(path: str, lo: int, hi: int) -> Iterator[Row]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    start = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if start + n > lo and start < hi:  # read only the row groups that overlap [lo, hi)
            table = pf.read_row_group(g)
            a, b = max(lo - start, 0), min(hi - start, n)
            for k, row in enumerate(table.slice(a, b - a).to_pylist()):
                yield start + a + k, None, row
        start += n


_CACHE: Dict[tuple, Any] = {}  # parsed JSON arrays and hub data sets, read once per process


def _json_array(path: str, compressed: bool) -> list:
    st = os.stat(path)
    key = ("array", path, st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        opener = gzip.open if compressed else open
        try:
            with opener(path, "rb") as stream:
                rows = json.load(stream)
        except ValueError as e:
            raise DataError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json file must hold an array of rows or one JSON object per line")
        _CACHE[key] = rows
    return _CACHE[key]


def _dataset(path: str, split: str, hub: bool, where: str):
    """A hub data set (kept for the process), or a saved one (memory-mapped: opening it again costs nothing)."""
    key = ("hub", path, split)
    if not hub or key not in _CACHE:
        import datasets

        try:
            ds = datasets.load_dataset(path, split=split) if hub else datasets.load_from_disk(path)
        except Exception as e:
            what = "hub data set" if hub else "saved data set"
            raise DataError(f"{where}: cannot load {what} {path!r}: {' '.join(str(e).split())[:300]}") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{where}: {path} has no split {split!r} (it has {', '.join(ds)})")
            ds = ds[split]
        if not hub:
            return ds
        _CACHE[key] = ds
    return _CACHE[key]


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, n)) for n in ("state.json", "dataset_dict.json"))


def _first_char(path: str, compressed: bool) -> bytes:
    with (gzip.open if compressed else open)(path, "rb") as stream:
        return stream.read(4096).lstrip()[:1]


def _uncompressed_size(path: str) -> int:
    """The gzip trailer's size (modulo 4 GiB, last member only): an estimate, used only to balance shards."""
    with open(path, "rb") as stream:
        stream.seek(-4, os.SEEK_END)
        size = struct.unpack("<I", stream.read(4))[0]
    return max(size, os.path.getsize(path))


# ----------------------------------------------------------------------------------------------------- locations
def location(f: InputFile, pos: int, line: Optional[int]) -> str:
    """`file:line` for JSON Lines, `file[row]` for row-indexed sources."""
    if f.kind == "lines":
        return f"{f.path}:{line if line is not None else line_number(f.path, pos)}"
    return f"{f.path}[{pos}]"


def line_number(path: str, pos: int) -> int:
    """1-based line number of the line starting at byte `pos` of a plain file (reads the file up to there)."""
    count, done = 1, 0
    with open(path, "rb") as stream:
        while done < pos:
            chunk = stream.read(min(1 << 20, pos - done))
            if not chunk:
                break
            count += chunk.count(b"\n")
            done += len(chunk)
    return count
