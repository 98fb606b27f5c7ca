"""One preprocessing array task: shard `index` of `num_shards` reads its part of the rows, formats and tokenizes
them, and writes a `datasets` directory under the fingerprint's output directory.

  output_dir(recipe)                     <data.cache_dir>/<fingerprint>
  run_shard(recipe, index, num_shards)   idempotent: returns at once when the shard's marker exists
  write_manifest(recipe)                 manifest.json from all shards' markers: the data stage's last step, taken
                                         by whichever shard finishes last
  shards_status(recipe)                  which shards are done (the launcher skips them)

A shard writes under a temporary name, renames it, then writes its marker `shard-I-of-N.done.json` (its statistics).
The marker is the only sign of completion: a shard killed at any point leaves no marker, and a rerun redoes it.

The fingerprint covers everything that changes the tokenized rows: the content of the data files, the tokenizer's
files, the row formats and their templates, data.sequence_len, data.train_on_inputs, data.too_long, and
DATA_CODE_VERSION. It leaves out what only changes how the rows are used (num_shards, the split, packing), so a
different number of shards reuses the same directory and gives the same rows.

Cores: a shard is one process on one core. The tokenizer parallelises its batches over the cores it can see unless
TOKENIZERS_PARALLELISM=false; give each array task the cores it should use (Slurm's cpus_per_task) and scale out with
shards.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ftlib import progress
from ftlib.checkpoints import no_space_in_one_line
from ftlib.data import DataError
from ftlib.data import formats
from ftlib.data.sources import InvalidJSON, Part, list_files, location, read_part, shard_parts
from ftlib.rundir import publish_dir, read_json, write_json

log = progress.logger("data")

DATA_CODE_VERSION = 1      # bump when a change to formats/tokenize changes the rows written
BATCH_ROWS = 1000          # rows per tokenizer call
PROGRESS_EVERY_S = 10.0    # seconds between progress lines
EXAMPLES_KEPT = 5          # file:line examples kept per skip reason

__all__ = ["DataError", "fingerprint", "output_dir", "run_shard", "write_manifest", "shards_status", "shard_name"]


# ----------------------------------------------------------------------------------------------------- fingerprint
def fingerprint(recipe) -> str:
    return hashlib.sha256(json.dumps(fingerprint_inputs(recipe), sort_keys=True).encode()).hexdigest()[:16]


def output_dir(recipe) -> Path:
    return Path(recipe.data.cache_dir) / fingerprint(recipe)


def fingerprint_inputs(recipe) -> dict:
    """Everything the tokenized rows depend on (written to fingerprint.json for people to read)."""
    d = recipe.data
    hashes = _HashCache(Path(d.cache_dir) / ".hashes")
    used = {s.format for s in d.sources}
    tok_dir = recipe.model.tokenizer or recipe.model.name_or_path
    return {
        "code_version": DATA_CODE_VERSION,
        "sources": [{"format": s.format, "split": s.split, "max_rows": s.max_rows, "fields": dict(s.fields),
                     "content": _source_content(s.path, hashes)} for s in d.sources],
        "tokenizer": _tokenizer_content(tok_dir, hashes),
        "templates": {
            "alpaca": {"style": d.prompt_style, "text": formats.TEMPLATES[d.prompt_style]} if "alpaca" in used else None,
            # (the tokenizer's own template is in its files, hashed above)
            "messages": {"recipe": d.chat_template, "default": formats.DEFAULT_CHAT_TEMPLATE}
            if "messages" in used else None,
        },
        "sequence_len": d.sequence_len,
        "train_on_inputs": d.train_on_inputs,
        "too_long": d.too_long,
    }


class _HashCache:
    """sha256 of files, remembered by (path, size, mtime) so that big inputs are hashed once, not by every task."""

    def __init__(self, folder: Path):
        self.folder = folder

    def file(self, path: str) -> str:
        st = os.stat(path)
        key = {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        memo = self.folder / (hashlib.sha256(key["path"].encode()).hexdigest()[:24] + ".json")
        known = read_json(memo, {})
        if {k: known.get(k) for k in key} == key and "sha256" in known:
            return known["sha256"]
        h = hashlib.sha256()
        with open(path, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                h.update(chunk)
        try:
            write_json(memo, {**key, "sha256": h.hexdigest()})
        except OSError:
            pass  # a read-only cache only costs time
        return h.hexdigest()

    def tree(self, folder: str, keep=lambda name: True) -> Dict[str, str]:
        out = {}
        for root, _, names in os.walk(folder):
            for name in sorted(names):
                full = os.path.join(root, name)
                rel = os.path.relpath(full, folder)
                if keep(name):
                    out[rel] = self.file(full)
        return dict(sorted(out.items()))


def _source_content(path: str, hashes: _HashCache):
    import glob

    if not os.path.isabs(path):
        return {"hub": path}  # a hub data set is known by its name
    matches = sorted(glob.glob(path)) if any(ch in path for ch in "*?[") else [path]
    return [hashes.tree(m) if os.path.isdir(m) else hashes.file(m) for m in matches]


_TOKENIZER_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|chat_template.*|vocab.*|"
                              r"merges.*|.*\.model|.*\.tiktoken|.*\.py)$")


def _tokenizer_content(name: str, hashes: _HashCache):
    if not os.path.isdir(name):
        return {"hub": name}
    return hashes.tree(name, keep=lambda n: bool(_TOKENIZER_FILES.match(n)))


# ----------------------------------------------------------------------------------------------------- layout
def shard_name(index: int, num_shards: int) -> str:
    return f"shard-{index:05d}-of-{num_shards:05d}"


def _marker(out: Path, index: int, num_shards: int) -> Path:
    return out / f"{shard_name(index, num_shards)}.done.json"


def _done_markers(out: Path) -> Dict[int, Dict[int, Path]]:
    """{num_shards: {index: marker}} for every finished shard in `out`."""
    found: Dict[int, Dict[int, Path]] = {}
    for p in out.glob("shard-*-of-*.done.json") if out.is_dir() else []:
        m = re.fullmatch(r"shard-(\d+)-of-(\d+)\.done\.json", p.name)
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
    return found


# ----------------------------------------------------------------------------------------------------- one shard
def run_shard(recipe, index: int, num_shards: int) -> Path:
    """Tokenize shard `index` of `num_shards`; returns its directory. Raises DataError when more than
    data.max_bad_fraction of its rows are malformed, and NoSpace ("no space left on DIR: writing SHARD (N MiB
    free)") when the disk or quota fills up while it is written, after removing the partial shard; either way
    nothing is marked complete, and a rerun redoes this shard only."""
    out = output_dir(recipe)
    name = shard_name(index, num_shards)
    final, marker = out / name, _marker(out, index, num_shards)
    tag = f"preprocess shard {index} of {num_shards}"
    if marker.exists():
        log.info(f"{tag}: already done ({final})")
        with no_space_in_one_line(out, "manifest.json"):
            _manifest_if_last(recipe, out, num_shards)
        return final
    with no_space_in_one_line(out, "fingerprint.json"):  # a full disk or quota: one line naming both
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "fingerprint.json").exists():
            write_json(out / "fingerprint.json", fingerprint_inputs(recipe))

    from ftlib.model import load_tokenizer

    started = time.time()
    tokenizer = load_tokenizer(recipe)
    parts = shard_parts(list_files(recipe), index, num_shards)
    threads = os.environ.get("TOKENIZERS_PARALLELISM", "unset (on)")
    log.info(f"{tag}: {len(parts)} file part(s) -> {final}; {_cores()} core(s) visible, "
             f"tokenizer threads TOKENIZERS_PARALLELISM={threads}")

    shard = _Shard(recipe, tokenizer, tag)
    for part in parts:
        shard.read(part)
    stats = shard.finish(index, num_shards, time.time() - started)

    import datasets
    from datasets.table import InMemoryTable

    tmp = out / f"{name}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a progress bar is noise in a Slurm log; our own lines say enough
    # A full disk or quota anywhere below: one line naming the folder and the space left (NoSpace), after the
    # partial shard is removed, so the space is given back and nothing looks written.
    with no_space_in_one_line(out, name):
        try:
            table = shard.table()
            # An empty shard still needs one (empty) file, or it cannot be loaded back.
            # Naming the data set's fingerprint spares `datasets` hashing every row to make one up.
            rows = datasets.Dataset(InMemoryTable(table), fingerprint=f"{out.name}-{name}")
            rows.save_to_disk(str(tmp), num_shards=1 if table.num_rows == 0 else None)
            if marker.exists():  # another run of this shard finished first: keep its output
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            publish_dir(tmp, final)  # (replaces a folder left by a run killed between its rename and its marker)
            stats["seconds"] = round(time.time() - started, 3)
            stats["files"] = _files_of(final)  # what verify_shard checks before the shard is trusted
            write_json(marker, stats)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if bars:
                datasets.enable_progress_bars()
    log.info(f"{tag}: done in {stats['seconds']:.1f} s: {_summary(stats)}")
    with no_space_in_one_line(out, "manifest.json"):
        _manifest_if_last(recipe, out, num_shards)
    return final


def _files_of(shard: Path) -> Dict[str, int]:
    """{path relative to the shard: bytes} of every file of a written shard."""
    return {str(p.relative_to(shard)): p.stat().st_size for p in sorted(shard.rglob("*")) if p.is_file()}


def verify_shard(out: Path, index: int, num_shards: int) -> Optional[str]:
    """None if shard `index` holds the files its marker recorded, with their sizes; else what is wrong, e.g.
    "data-00000-of-00001.arrow is 1,024 bytes, 2,206,672 when written (truncated)". A stat per file: cheap enough
    for every launch and every training start. (Markers written before they listed files pass.)"""
    recorded = (read_json(_marker(out, index, num_shards), {}) or {}).get("files")
    if recorded is None:
        return None
    shard = out / shard_name(index, num_shards)
    problems = []
    for rel, size in recorded.items():
        try:
            now = (shard / rel).stat().st_size
        except FileNotFoundError:
            problems.append(f"{rel} is missing")
            continue
        if now != size:
            how = "truncated" if now < size else "longer than written"
            problems.append(f"{rel} is {now:,} bytes, {size:,} when written ({how})")
    if not problems:
        return None
    return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def invalidate_shard(out: Path, index: int, num_shards: int, why: str) -> str:
    """Take back a damaged shard's marker (kept aside as .damaged.json), so that the next submission tokenizes it
    again; returns the one line that says so."""
    marker = _marker(out, index, num_shards)
    try:
        os.replace(marker, marker.with_name(marker.name.replace(".done.json", ".damaged.json")))
        taken = "its completion marker is withdrawn: the next `make train` or `make preprocess` tokenizes it again"
    except FileNotFoundError:
        taken = "its completion marker was already withdrawn: the next submission tokenizes it again"
    except OSError as e:  # a shared cache of another user's
        taken = f"its marker could not be withdrawn ({e.strerror}): ask the cache's owner, or use another data.cache_dir"
    return f"{out / shard_name(index, num_shards)}: shard {index} of {num_shards} is damaged: {why}; {taken}"


def _manifest_if_last(recipe, out: Path, num_shards: int) -> None:
    """The shard that completes the set writes the manifest and checks the data set's share of malformed rows
    (DataError: this task fails, and what depends on the data stage does not start). Two shards finishing at once
    may both write it: the same content, written atomically."""
    if len(_done_markers(out).get(num_shards, {})) == num_shards:
        if not has_manifest(out, num_shards):
            write_manifest(recipe)
        rejected = rows_rejected(recipe, out)
        if rejected:
            raise DataError(rejected)


def rows_rejected(recipe, out: Path) -> Optional[str]:
    """Why the data set in `out` cannot be trained on under the recipe's data.max_bad_fraction, from its manifest
    (so raising the limit needs no new tokenization: the limit is not part of the fingerprint)."""
    manifest = read_json(out / "manifest.json", {})
    n = manifest.get("num_shards", 0)
    return bad_rows_error(manifest, recipe.data.max_bad_fraction, f"the data set ({n} shard{'s' * (n != 1)})") \
        if manifest else None


def has_manifest(out: Path, num_shards: int) -> bool:
    """The data stage is done: the manifest of this set of shards is written (the same rows may have been written
    before as another number of shards, with its own manifest)."""
    return read_json(out / "manifest.json", {}).get("num_shards") == num_shards


class _Shard:
    """Reads parts, validates and formats rows, tokenizes them in batches, and counts everything."""

    def __init__(self, recipe, tokenizer, tag: str):
        from ftlib.data.tokenize import Encoder

        d = recipe.data
        self.recipe, self.tag = recipe, tag
        self.encoder = Encoder(tokenizer, d.sequence_len, d.too_long, d.train_on_inputs)
        self.render = formats.chat_renderer(tokenizer, d.chat_template)
        self.tables: list = []
        self.read_rows = self.written = self.truncated = self.tokens = self.trained = 0
        self.skipped: Counter = Counter()
        self.bad_by_file: Counter = Counter()
        self.examples: Dict[str, list] = {}
        self.lengths = np.zeros(d.sequence_len + 1, dtype=np.int64)
        self.started = self.last_line = time.time()
        self.done_share = 0.0

    def read(self, part: Part) -> None:
        f = part.file
        source = self.recipe.data.sources[f.source]
        fields, style = dict(source.fields), self.recipe.data.prompt_style
        texts, spans, where = [], [], []
        extent = (min(part.hi, f.size) - part.lo) or 1
        for pos, line, row in read_part(part):
            self.read_rows += 1
            if isinstance(row, InvalidJSON):
                self._skip(f, pos, line, "invalid_json", row.detail)
                continue
            try:
                if source.format == "alpaca":
                    text, prompt_len = formats.alpaca_example(row, style, fields)
                    span = [(prompt_len, len(text))]
                elif source.format == "completion":
                    text = formats.completion_example(row, fields)
                    span = [(0, len(text))]
                else:
                    text, span = formats.messages_example(row, self.render, fields)
            except formats.BadRow as e:
                self._skip(f, pos, line, e.reason, e.detail)
                continue
            texts.append(text)
            spans.append(span)
            where.append((pos, line))
            if len(texts) == BATCH_ROWS:
                self._encode(f, source.format, texts, spans, where)
                texts, spans, where = [], [], []
                self._progress(self.done_share + part.share * min((pos - part.lo) / extent, 1.0))
        if texts:
            self._encode(f, source.format, texts, spans, where)
        self.done_share += part.share

    def _encode(self, f, fmt: str, texts, spans, where) -> None:
        chat = fmt == "messages"  # chat templates write their own BOS and end-of-turn tokens
        enc = self.encoder.encode(texts, spans, add_special_tokens=not chat, add_eos=not chat)
        for s in enc.skipped:
            self._skip(f, *where[s.index], s.reason, s.detail)
        rows = len(enc.offsets) - 1
        self.written += rows
        self.truncated += enc.truncated
        self.tokens += len(enc.input_ids)
        self.trained += int(np.count_nonzero(enc.labels != -100))
        self.lengths += np.bincount(np.diff(enc.offsets), minlength=len(self.lengths))
        if rows:
            self.tables.append(enc.table())

    def _skip(self, f, pos: int, line: Optional[int], reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        if reason in formats.MALFORMED:
            self.bad_by_file[f.path] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < EXAMPLES_KEPT:
            kept.append((f, pos, line, detail))

    def _progress(self, fraction: float) -> None:
        now = time.time()
        if now - self.last_line < PROGRESS_EVERY_S:
            return
        self.last_line = now
        elapsed = now - self.started
        rate = self.read_rows / max(elapsed, 1e-9)
        left = elapsed * (1 - fraction) / fraction if fraction > 0 else float("nan")
        log.info(f"{self.tag}: {self.read_rows:,} rows read ({fraction:.0%}), {self.written:,} written, "
                 f"{sum(self.skipped.values()):,} skipped, {rate:,.0f} rows/s, {elapsed:.0f} s elapsed, "
                 f"~{left:.0f} s left")

    def table(self):
        import pyarrow as pa

        if self.tables:
            return pa.concat_tables(self.tables)
        from ftlib.data.tokenize import Encoded

        empty = np.zeros(0, dtype=np.int32)
        return Encoded(np.zeros(1, dtype=np.int32), empty, empty).table()

    def finish(self, index: int, num_shards: int, seconds: float) -> dict:
        return {
            "index": index,
            "num_shards": num_shards,
            "rows_read": self.read_rows,
            "rows_written": self.written,
            "rows_skipped": {r: self.skipped.get(r, 0) for r in formats.REASONS},
            "skipped_examples": {r: [f"{location(f, pos, line)}: {detail}" for f, pos, line, detail in kept]
                                 for r, kept in self.examples.items()},
            "malformed_by_file": dict(self.bad_by_file),
            "truncated": self.truncated,
            "tokens": self.tokens,
            "trained_tokens": self.trained,
            "length_counts": {str(n): int(c) for n, c in enumerate(self.lengths) if c},
            "host": socket.gethostname(),
            "seconds": round(seconds, 3),
        }


def bad_rows_error(stats: dict, limit: float, where: str) -> Optional[str]:
    """The one-line reason to refuse these rows (a shard's statistics or the manifest), None if at most `limit` of
    them are malformed. The data stage applies it to the whole data set: per shard, the same rows could pass as
    one shard and fail as four."""
    malformed = sum(stats["rows_skipped"][r] for r in formats.MALFORMED)
    read = stats["rows_read"]
    if not read or malformed / read <= limit:
        return None
    worst = max(stats["malformed_by_file"].items(), key=lambda kv: kv[1])[0]
    reasons = sorted(formats.MALFORMED, key=lambda r: -stats["rows_skipped"][r])
    details = "; ".join(f"{formats.REASONS[r]}: {stats['rows_skipped'][r]:,} (e.g. "
                        f"{', '.join(stats['skipped_examples'][r][:3])})" for r in reasons if stats["rows_skipped"][r])
    return (f"{worst}: {malformed:,} of {read:,} rows ({malformed / read:.1%}) in {where} are malformed, "
            f"more than data.max_bad_fraction={limit:.1%}; {details}")


def _summary(stats: dict) -> str:
    skipped = stats["rows_skipped"]
    malformed = sum(skipped[r] for r in formats.MALFORMED)
    why = ", ".join(f"{n:,} {formats.REASONS[r]}" for r, n in skipped.items() if n)
    text = f"{stats['rows_read']:,} rows read, {stats['rows_written']:,} written"
    if malformed or skipped["too_long"]:
        text += f", {malformed + skipped['too_long']:,} skipped ({why})"
    if stats["truncated"]:
        text += f", {stats['truncated']:,} truncated to data.sequence_len"
    return text + f", {stats['tokens']:,} tokens"


# ----------------------------------------------------------------------------------------------------- all shards
def shards_status(recipe) -> dict:
    """Which shards of the recipe's output are complete, for the launcher's "what is left to do". `num_shards` is
    the recipe's, unless only another count (a hand-submitted array of another size) is complete."""
    out = output_dir(recipe)
    damaged = {}
    for n, indices in _done_markers(out).items():  # a damaged shard is not done: withdraw its marker
        for index in indices:
            why = verify_shard(out, index, n)
            if why:
                damaged[index] = invalidate_shard(out, index, n, why)
    done = _done_markers(out)
    n = _complete_count(done, recipe.data.num_shards) or recipe.data.num_shards
    complete = sorted(done.get(n, {}))
    running = sorted({int(m.group(1)) for p in (out.glob(f"shard-*-of-{n:05d}.tmp-*") if out.is_dir() else [])
                      for m in [re.match(r"shard-(\d+)-of-", p.name)] if m} - set(complete))
    manifest = has_manifest(out, n)
    rejected = rows_rejected(recipe, out) if manifest else None
    return {
        "num_shards": n,
        "complete": complete,
        "missing": [i for i in range(n) if i not in complete],
        "in_progress": running,  # temporary folders: running now, or killed
        "damaged": damaged,  # {index: what was wrong}: found damaged now, marker withdrawn (so among "missing")
        "manifest": manifest,  # the stage's last step is done
        "rejected": rejected,  # too many malformed rows: why
        "ready": len(complete) == n and manifest and not rejected,  # the training can read it
    }


def complete_shards(recipe) -> List[Path]:
    """Directories of a complete set of shards, in index order; DataError naming what is missing otherwise."""
    out = output_dir(recipe)
    done = _done_markers(out)
    n = _complete_count(done, recipe.data.num_shards)
    if n is None:
        want = recipe.data.num_shards
        missing = [i for i in range(want) if i not in done.get(want, {})]
        others = "; ".join(f"{len(v)} of {k} shards done" for k, v in done.items() if k != want)
        raise DataError(f"{out}: preprocessing is incomplete: shard(s) {_ranges(missing)} of {want} are missing "
                        f"or unfinished{' (' + others + ')' if others else ''}; run the preprocess stage "
                        f"(make preprocess) and check its logs")
    return [out / shard_name(i, n) for i in range(n)]


def write_manifest(recipe) -> Path:
    """Aggregate every shard's statistics into manifest.json beside the shards, and remove temporary folders
    left by killed runs. Needs a complete set of shards."""
    dirs = complete_shards(recipe)
    out, n = dirs[0].parent, len(dirs)
    shards = [read_json(_marker(out, i, n)) for i in range(n)]
    skipped = {r: sum(s["rows_skipped"][r] for s in shards) for r in formats.REASONS}
    examples: Dict[str, list] = {}
    for s in shards:
        for r, kept in s["skipped_examples"].items():
            examples.setdefault(r, []).extend(kept[: EXAMPLES_KEPT - len(examples.get(r, []))])
    by_file: Counter = Counter()
    for s in shards:
        by_file.update(s["malformed_by_file"])
    lengths: Counter = Counter()
    for s in shards:
        lengths.update({int(k): v for k, v in s["length_counts"].items()})
    rows_read = sum(s["rows_read"] for s in shards)
    malformed = sum(skipped[r] for r in formats.MALFORMED)
    d = recipe.data
    manifest = {
        "fingerprint": out.name,
        "num_shards": n,
        "rows_read": rows_read,
        "rows_written": sum(s["rows_written"] for s in shards),
        "rows_skipped": skipped,
        "skipped_examples": examples,
        "malformed_fraction": malformed / rows_read if rows_read else 0.0,
        "malformed_by_file": dict(by_file),
        "max_bad_fraction": d.max_bad_fraction,
        "truncated": sum(s["truncated"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "trained_tokens": sum(s["trained_tokens"] for s in shards),
        "length_percentiles": _percentiles(lengths),
        "settings": {"sequence_len": d.sequence_len, "too_long": d.too_long, "train_on_inputs": d.train_on_inputs,
                     "prompt_style": d.prompt_style, "sources": [s.path for s in d.sources],
                     "tokenizer": recipe.model.tokenizer or recipe.model.name_or_path},
        "shards": [{k: s[k] for k in ("index", "rows_read", "rows_written", "tokens", "host", "seconds")}
                   for s in shards],
    }
    path = out / "manifest.json"
    write_json(path, manifest)
    for tmp in out.glob("shard-*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    if malformed:
        log.info(f"data: skipped {malformed:,} malformed row(s) of {rows_read:,} ({manifest['malformed_fraction']:.2%}"
                 f"); see {path}")
    return path


def _complete_count(done: Dict[int, Dict[int, Path]], preferred: int) -> Optional[int]:
    complete = [n for n, idx in done.items() if len(idx) == n]
    if preferred in complete:
        return preferred
    return min(complete) if complete else None


def _percentiles(counts: Counter) -> dict:
    if not counts:
        return {}
    lengths = np.array(sorted(counts))
    cum = np.cumsum([counts[n] for n in lengths])
    total = int(cum[-1])

    def pct(q):
        return int(lengths[np.searchsorted(cum, q / 100 * total)])

    mean = sum(n * c for n, c in counts.items()) / total
    return {"min": int(lengths[0]), "p50": pct(50), "p90": pct(90), "p99": pct(99), "max": int(lengths[-1]),
            "mean": round(mean, 1)}


def _ranges(indices: List[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, k in enumerate(indices):
        if start is None:
            start = k
        if i + 1 == len(indices) or indices[i + 1] != k + 1:
            out.append(str(start) if start == k else f"{start}-{k}")
            start = None
    return ", ".join(out)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
