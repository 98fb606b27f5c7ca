"""Sharded preprocessing: which rows each shard reads, shard-count invariance, idempotent reruns, fingerprints,
killed shards, bad rows, and the merge's split."""
import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from ftlib.data import DataError
from ftlib.data import preprocess
from ftlib.data.merge import load_splits, split_indices
from ftlib.data.sources import list_files, read_part, shard_parts
from tests.conftest import ROOT, SAMPLE_DATA, TINY_MODEL

pytestmark = pytest.mark.timeout(300)

SAMPLE = [json.loads(line) for line in SAMPLE_DATA.read_text().splitlines()]


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def sources(*entries):
    """data.sources override from (path, format[, extra]) tuples."""
    items = []
    for path, fmt, *extra in entries:
        items.append(f"{{path: '{path}', format: {fmt}{', ' + extra[0] if extra else ''}}}")
    return f"data.sources=[{', '.join(items)}]"


def run_all(recipe, num_shards):
    for i in range(num_shards):
        preprocess.run_shard(recipe, i, num_shards)


def columns(ds):
    return None if ds is None else {k: ds[k] for k in ds.column_names}


# ----------------------------------------------------------------------------------------------------- reading
def test_shards_partition_a_plain_file_by_byte_ranges(tmp_path, make_recipe):
    path = write_jsonl(tmp_path / "d.jsonl", SAMPLE[:100])
    recipe = make_recipe(sources((path, "alpaca")))
    files = list_files(recipe)
    everything = [pos for p in shard_parts(files, 0, 1) for pos, _, _ in read_part(p)]
    assert len(everything) == 100
    for n in (2, 3, 7):
        parts = [shard_parts(files, i, n) for i in range(n)]
        seen = [pos for shard in parts for p in shard for pos, _, _ in read_part(p)]
        assert seen == everything  # every row exactly once, and in order when the shards are put together
        for shard in parts[1:]:
            assert shard[0].lo > 0  # later shards seek into the file instead of reading it from the start
        assert all(shard[0].hi <= os.path.getsize(path) for shard in parts)


def test_shard_count_invariance_over_mixed_sources(tmp_path, make_recipe):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "a.jsonl", SAMPLE[:150])
    zipped = write_jsonl(tmp_path / "b.jsonl.gz", SAMPLE[150:250], gzip.open)
    (tmp_path / "c.json").write_text(json.dumps(SAMPLE[250:290]))
    pq.write_table(pa.Table.from_pylist(SAMPLE[290:350]), tmp_path / "d.parquet", row_group_size=25)
    datasets.Dataset.from_list(SAMPLE[350:380]).save_to_disk(str(tmp_path / "saved"))
    chats = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
        for r in SAMPLE[380:410]])
    texts = write_jsonl(tmp_path / "text.jsonl", [{"story": r["output"]} for r in SAMPLE[410:430]])
    spec = sources((tmp_path / "[abc].json*", "alpaca"), (tmp_path / "d.parquet", "alpaca"),
                   (tmp_path / "saved", "alpaca"), (chats, "messages"), (texts, "completion", "fields: {text: story}"))
    results = {}
    for n in (1, 3, 4):
        recipe = make_recipe(spec, "data.sequence_len=512", f"data.cache_dir={tmp_path / f'cache{n}'}")
        run_all(recipe, n)
        train, evaluation = load_splits(recipe)
        results[n] = (columns(train), columns(evaluation))
        manifest = json.loads((preprocess.output_dir(recipe) / "manifest.json").read_text())
        assert manifest["rows_read"] == 430 and manifest["num_shards"] == n
        assert manifest["rows_written"] == len(train) + len(evaluation)
    assert results[1] == results[3] == results[4]
    assert len(results[1][1]["input_ids"]) == 9  # ceil(2% of the ~430 rows kept)
    assert manifest["rows_skipped"]["too_long"] < 10 and not manifest["malformed_fraction"]


def test_split_is_the_notebooks(tmp_path):
    import datasets

    n = 1000
    ds = datasets.Dataset.from_dict({"i": list(range(n))}).shuffle(seed=42).train_test_split(test_size=0.02,
                                                                                            shuffle=False)
    train, evaluation = split_indices(n, 0.02, 42)
    assert list(train) == ds["train"]["i"] and list(evaluation) == ds["test"]["i"]


def test_max_rows_and_gzip_inputs(tmp_path, make_recipe):
    zipped = write_jsonl(tmp_path / "b.jsonl.gz", SAMPLE[:300], gzip.open)
    for n in (1, 3):
        recipe = make_recipe(sources((zipped, "alpaca", "max_rows: 120")), f"data.cache_dir={tmp_path / str(n)}")
        run_all(recipe, n)
        manifest = json.loads(preprocess.write_manifest(recipe).read_text())
        assert manifest["rows_read"] == 120


# ----------------------------------------------------------------------------------------------------- reruns
def test_rerun_skips_finished_shards_and_fingerprint_tracks_inputs(tmp_path, make_recipe):
    data = write_jsonl(tmp_path / "d.jsonl", SAMPLE[:60])
    base = [sources((data, "alpaca"))]
    recipe = make_recipe(*base)
    out = preprocess.output_dir(recipe)
    assert out.parent == tmp_path / "cache" and len(out.name) == 16
    run_all(recipe, 2)
    marker = out / "shard-00000-of-00002.done.json"
    before = (marker.stat().st_mtime_ns, (out / "shard-00000-of-00002").stat().st_ino)
    assert preprocess.run_shard(recipe, 0, 2) == out / "shard-00000-of-00002"
    assert (marker.stat().st_mtime_ns, (out / "shard-00000-of-00002").stat().st_ino) == before

    fp = preprocess.fingerprint(recipe)
    # What only changes how rows are used keeps the directory...
    for same in ("data.num_shards=5", "data.eval_fraction=0.1", "data.split_seed=1", "data.packing=true",
                 "data.max_bad_fraction=0.5", "train.max_steps=3"):
        assert preprocess.fingerprint(make_recipe(*base, same)) == fp, same
    # ...what changes the rows makes a new one.
    for other in ("data.sequence_len=128", "data.prompt_style=chat", "data.train_on_inputs=true",
                  "data.too_long=drop", sources((data, "alpaca", "max_rows: 10")),
                  sources((data, "completion", "fields: {text: output}"))):
        assert preprocess.fingerprint(make_recipe(*base, other)) != fp, other
    tok = tmp_path / "tok"
    tok.mkdir()
    for f in TINY_MODEL.iterdir():
        (tok / f.name).write_bytes(f.read_bytes())
    same_tok = make_recipe(*base, f"model.tokenizer={tok}")
    assert preprocess.fingerprint(same_tok) == fp  # the same tokenizer files, elsewhere
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False}))
    assert preprocess.fingerprint(make_recipe(*base, f"model.tokenizer={tok}")) != fp
    with open(data, "a") as f:
        f.write(json.dumps(SAMPLE[100]) + "\n")
    changed = make_recipe(*base)
    assert preprocess.fingerprint(changed) != fp
    assert not preprocess.shards_status(changed)["complete"]


KILL = textwrap.dedent("""
    import os, signal, sys
    from ftlib import recipe as R
    from ftlib.data import preprocess
    recipe = R.load(sys.argv[1], sys.argv[3:])
    where = sys.argv[2]
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    if where == "rename":   # the rows are written under the temporary name, not yet renamed
        preprocess.os.replace = die
    else:                   # renamed, but no completion marker yet
        real = preprocess.write_json
        preprocess.write_json = lambda path, data, *a: die() if path.name.endswith(".done.json") else real(path, data)
    preprocess.run_shard(recipe, 1, 2)
""")


@pytest.mark.parametrize("where", ["rename", "marker"])
def test_a_killed_shard_leaves_nothing_that_looks_complete(tmp_path, make_recipe, where):
    data = write_jsonl(tmp_path / "d.jsonl", SAMPLE[:80])
    overrides = [f"run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", sources((data, "alpaca"))]
    recipe = make_recipe(*overrides[2:])
    preprocess.run_shard(recipe, 0, 2)
    killed = subprocess.run([sys.executable, "-c", KILL, str(ROOT / "recipes" / "demo.yaml"), where, *overrides],
                            cwd=ROOT, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    out = preprocess.output_dir(recipe)
    assert not (out / "shard-00001-of-00002.done.json").exists()
    status = preprocess.shards_status(recipe)
    assert status["complete"] == [0] and status["missing"] == [1] and not status["ready"]
    assert status["in_progress"] == ([1] if where == "rename" else [])
    with pytest.raises(DataError, match=r"shard\(s\) 1 of 2 are missing"):
        load_splits(recipe)
    preprocess.run_shard(recipe, 1, 2)  # the rerun redoes it
    train, evaluation = load_splits(recipe)
    assert len(train) + len(evaluation) == 80 - json.loads((out / "manifest.json").read_text())["rows_skipped"][
        "too_long"]
    assert not list(out.glob("*.tmp-*"))  # the manifest step cleared the killed run's leftovers


def test_load_splits_reads_shards_without_writing_into_them(tmp_path, make_recipe):
    data = write_jsonl(tmp_path / "d.jsonl", SAMPLE[:100])
    recipe = make_recipe(sources((data, "alpaca")), "data.sequence_len=512")
    run_all(recipe, 2)
    preprocess.write_manifest(recipe)
    out = preprocess.output_dir(recipe)

    def snapshot():
        return sorted((str(p.relative_to(out)), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file())

    before = snapshot()
    train, evaluation = load_splits(recipe)
    recipe.data.packing = True
    packed, _ = load_splits(recipe)
    assert len(train) and len(evaluation) == 2 and len(packed) < len(train)
    after = [x for x in snapshot() if x[0] != "manifest.json"]
    assert after == [x for x in before if x[0] != "manifest.json"]


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_a_damaged_shard_is_named_and_tokenized_again(tmp_path, make_recipe, damage):
    """An arrow file of a finished shard is cut short (a copy or a disk that failed) or garbled at the same size.
    Training used to fail with Arrow's "Expected to be able to read N bytes" naming no shard, and every resubmission
    skipped the shard (its marker was there) and failed the same way. Now the training names the shard and the file
    in one line and withdraws the shard's marker, and the launcher's check (shards_status) finds a truncated shard
    before anything starts; either way the next submission tokenizes that shard alone again."""
    data = write_jsonl(tmp_path / "d.jsonl", SAMPLE[:200])
    recipe = make_recipe(sources((data, "alpaca")), "data.num_shards=2")
    run_all(recipe, 2)
    out = preprocess.output_dir(recipe)
    shard = out / preprocess.shard_name(1, 2)
    (arrow,) = shard.glob("*.arrow")
    size, before = arrow.stat().st_size, arrow.read_bytes()  # (read, not memory-mapped: the test truncates it)
    if damage == "truncate":
        os.truncate(arrow, size // 2)
    else:
        arrow.write_bytes(b"\0" * size)
    with pytest.raises(DataError) as failed:
        load_splits(recipe)
    message = str(failed.value)
    assert "\n" not in message and f"{shard}: shard 1 of 2 is damaged" in message, message
    if damage == "truncate":
        assert f"{arrow.name} is {size // 2:,} bytes, {size:,} when written (truncated)" in message, message
    else:
        assert "cannot be read" in message, message
    assert "tokenizes it again" in message
    status = preprocess.shards_status(recipe)
    assert status["missing"] == [1] and status["complete"] == [0], status

    # The launcher's own check, before training: a truncated shard found and withdrawn at submission.
    preprocess.run_shard(recipe, 1, 2)
    assert arrow.read_bytes() == before  # the same rows again
    os.truncate(arrow, size - 1)
    status = preprocess.shards_status(recipe)
    assert status["missing"] == [1] and "(truncated)" in status["damaged"][1], status
    preprocess.run_shard(recipe, 1, 2)
    assert preprocess.shards_status(recipe)["ready"] and arrow.read_bytes() == before


def test_status_and_shards_run_by_hand_with_another_count(tmp_path, make_recipe):
    data = write_jsonl(tmp_path / "d.jsonl", SAMPLE[:40])
    recipe = make_recipe(sources((data, "alpaca")), "data.num_shards=2")
    preprocess.run_shard(recipe, 0, 3)
    with pytest.raises(DataError, match=r"shard\(s\) 0-1 of 2 .*1 of 3 shards done"):
        load_splits(recipe)
    preprocess.run_shard(recipe, 2, 3)
    preprocess.run_shard(recipe, 1, 3)  # e.g. `sbatch --array=0-2`: N comes from the array, not the recipe
    status = preprocess.shards_status(recipe)
    assert status["num_shards"] == 3 and status["complete"] == [0, 1, 2] and status["ready"]
    train, evaluation = load_splits(recipe)
    assert len(train) + len(evaluation) > 30


def test_more_shards_than_rows(tmp_path, make_recipe):
    import datasets

    data = write_jsonl(tmp_path / "d.jsonl", ["\ufeff" + json.dumps(SAMPLE[0])] + SAMPLE[1:5])  # a BOM, too
    recipe = make_recipe(sources((data, "alpaca")), "data.num_shards=8", "data.eval_fraction=0")
    run_all(recipe, 8)
    train, evaluation = load_splits(recipe)
    assert datasets.load_from_disk(str(preprocess.output_dir(recipe) / "shard-00001-of-00008")).num_rows == 0
    assert evaluation is None and len(train) == 5 - json.loads(
        (preprocess.output_dir(recipe) / "manifest.json").read_text())["rows_skipped"]["too_long"]


def test_progress_lines_read_well_in_a_log(tmp_path, make_recipe, monkeypatch, caplog):
    data = write_jsonl(tmp_path / "d.jsonl", SAMPLE[:50])
    monkeypatch.setattr(preprocess, "BATCH_ROWS", 10)
    monkeypatch.setattr(preprocess, "PROGRESS_EVERY_S", 0.0)
    with caplog.at_level("INFO", logger="ftlib.data"):
        preprocess.run_shard(make_recipe(sources((data, "alpaca"))), 0, 1)
    lines = [r.getMessage() for r in caplog.records]
    progress = [m for m in lines if "rows/s" in m]
    assert len(progress) >= 4 and progress[0].startswith("preprocess shard 0 of 1: 10 rows read (")
    assert lines[-1].startswith("preprocess shard 0 of 1: done in") and "50 rows read" in lines[-1]
    assert all("\n" not in m and "\r" not in m for m in lines)


# ----------------------------------------------------------------------------------------------------- bad rows
BAD_FILE = [
    SAMPLE[0],
    "{not json",                                            # line 2
    {"instruction": "No output here."},                     # line 3
    SAMPLE[1],
    "",                                                     # blank lines are not rows
    {"instruction": "A list", "output": ["a", "b"]},        # line 6
    '["a", "row", "that", "is", "a", "list"]',              # line 7
    {"instruction": "Empty", "input": "", "output": " "},   # line 8
    {"instruction": "Long " * 400, "output": "x"},          # line 9: the prompt alone is longer than sequence_len
] + SAMPLE[2:12]


def test_bad_rows_counted_located_and_thresholded(tmp_path, make_recipe, caplog):
    data = write_jsonl(tmp_path / "bad.jsonl", BAD_FILE)
    # 5 malformed of 18 rows; more than the default 1%: the (last) shard fails with a one-line message, and the
    # data stage is not done.
    recipe = make_recipe(sources((data, "alpaca")))
    with pytest.raises(DataError) as e:
        preprocess.run_shard(recipe, 0, 1)
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(data))
    assert "5 of 18 rows" in message and "max_bad_fraction=1.0%" in message
    assert f"invalid JSON: 1 (e.g. {data}:2" in message and f"missing field: 1 (e.g. {data}:3" in message
    assert not preprocess.shards_status(recipe)["ready"] and preprocess.shards_status(recipe)["rejected"] == message
    with pytest.raises(DataError, match="5 of 18 rows"):
        load_splits(recipe)

    # Allowed: it proceeds, says what it skipped, and the manifest has counts and exact file:line locations, also
    # for a shard that starts in the middle of the file.
    recipe = make_recipe(sources((data, "alpaca")), "data.max_bad_fraction=0.6")  # of the data set: 5 of 18
    with caplog.at_level("INFO", logger="ftlib.data"):
        run_all(recipe, 2)
        manifest = json.loads(preprocess.write_manifest(recipe).read_text())
    assert manifest["rows_read"] == 18 and manifest["rows_written"] == 12
    assert manifest["rows_skipped"] == {"invalid_json": 1, "missing_field": 1, "wrong_type": 2, "empty_output": 1,
                                        "too_long": 1}
    where = {r: [x.split(": ")[0] for x in v] for r, v in manifest["skipped_examples"].items()}
    assert where == {"invalid_json": [f"{data}:2"], "missing_field": [f"{data}:3"],
                     "wrong_type": [f"{data}:6", f"{data}:7"], "empty_output": [f"{data}:8"],
                     "too_long": [f"{data}:9"]}
    assert manifest["malformed_fraction"] == pytest.approx(5 / 18)
    assert manifest["length_percentiles"]["max"] <= recipe.data.sequence_len and manifest["tokens"] > 0
    assert any("skipped 5 malformed row(s) of 18" in r.getMessage() for r in caplog.records)

    drop = make_recipe(sources((data, "alpaca")), "data.max_bad_fraction=0.6", "data.too_long=drop")
    run_all(drop, 1)
    manifest = json.loads(preprocess.write_manifest(drop).read_text())
    assert manifest["rows_skipped"]["too_long"] == manifest["rows_read"] - manifest["rows_written"] - 5 >= 1


@pytest.mark.parametrize("limit,passes", [(0.3, True), (0.2, False)])
def test_the_bad_row_limit_applies_to_the_whole_data_set_whatever_the_shard_count(tmp_path, make_recipe, limit,
                                                                                  passes):
    """5 of 18 rows are malformed (28%), all in the first half of the file: as 4 shards, the first shard alone
    is 80% malformed. The limit judges the data set, so 1 shard and 4 shards give the same answer."""
    data = write_jsonl(tmp_path / "bad.jsonl", BAD_FILE)
    for n in (1, 4):
        recipe = make_recipe(sources((data, "alpaca")), f"data.max_bad_fraction={limit}", f"data.num_shards={n}",
                             f"data.cache_dir={tmp_path / f'cache-{n}'}", "data.eval_fraction=0")
        if passes:
            run_all(recipe, n)
            train, _ = load_splits(recipe)
            assert len(train) == 12, n
        else:
            with pytest.raises(DataError, match=rf"5 of 18 rows \(27.8%\) in the data set \({n} shards?\)"):
                run_all(recipe, n)
            assert preprocess.shards_status(recipe)["rejected"], n


def test_sources_that_cannot_be_read(tmp_path, make_recipe):
    (tmp_path / "d.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="unsupported file type"):
        list_files(make_recipe(sources((tmp_path / "d.csv", "alpaca"))))
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="not one saved with datasets"):
        list_files(make_recipe(sources((tmp_path / "folder", "alpaca"))))
    with pytest.raises(DataError, match="cannot load hub data set 'nobody/nothing'"):
        list_files(make_recipe("data.sources=[{path: nobody/nothing, format: alpaca}]"))
