"""Files of a run and of the data cache are private to their user (or shared with run.group, read-only), and a
secret passed in with ${oc.env:NAME} appears in no file of the run and not in the dry run's output."""
import grp
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ftlib import recipe as recipe_mod
from ftlib.rundir import RunDir
from launcher import jobs, launch
from tests.conftest import DEMO, ROOT

pytestmark = [pytest.mark.security]


def readable_by_others(*roots: Path, allowed: int = 0) -> list:
    """Every file or folder under `roots` whose mode gives more than `allowed` to group and others."""
    found = []
    for root in roots:
        for path in [root, *root.rglob("*")]:
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode) and stat.S_IMODE(mode) & 0o077 & ~allowed:
                found.append(f"{oct(stat.S_IMODE(mode))} {path}")
    return found


@pytest.fixture
def umask_restored():
    before = os.umask(0o022)
    os.umask(before)
    yield
    os.umask(before)


def test_a_run_and_its_cache_are_private_whatever_the_umask(make_recipe, umask_restored):
    os.umask(0o022)  # the usual default, which would make everything world-readable
    recipe = make_recipe("data.sources[0].max_rows=60")
    launch.run_local(recipe, ["preprocess"])
    run = RunDir.of(recipe)
    assert any(Path(recipe.data.cache_dir).rglob("manifest.json")), "the preprocessing wrote nothing"
    assert readable_by_others(run.root, Path(recipe.data.cache_dir)) == []
    assert stat.S_IMODE(run.recipe.stat().st_mode) == 0o600


def test_run_group_shares_read_only_with_that_group(make_recipe, umask_restored):
    group = grp.getgrgid(os.getgid()).gr_name
    recipe = make_recipe("data.sources[0].max_rows=60", f"run.group={group}", "data.num_shards=1")
    launch.save_recipe(recipe)
    jobs.preprocess_shard(recipe, 0, 1)  # in this process: the launcher's part is the test above
    run, cache = RunDir.of(recipe), Path(recipe.data.cache_dir)
    assert readable_by_others(run.root, cache, allowed=0o050) == []  # the group reads (and enters), others nothing
    assert stat.S_IMODE(run.root.stat().st_mode) == 0o2750 and run.root.stat().st_gid == os.getgid()
    assert stat.S_IMODE(run.recipe.stat().st_mode) == 0o640
    with pytest.raises(Exception, match="run.group: no Unix group named 'no-such-group-ftl'"):
        launch.save_recipe(make_recipe("run.group=no-such-group-ftl"))


def test_a_secret_from_the_environment_stays_out_of_files_and_the_dry_run(tmp_path):
    secret = "hf_s3cr3t_0123456789abcdef"
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"base: {DEMO}\nslurm:\n  train:\n    setup: ['export HF_TOKEN=${{oc.env:FT_TEST_SECRET}}']\n")
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "ftlib", "train", str(mine), f"run.dir={run_dir}",
                          f"data.cache_dir={tmp_path / 'cache'}", "--dry-run"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "FT_TEST_SECRET": secret})
    assert out.returncode == 0, out.stderr
    assert "export HF_TOKEN=${oc.env:FT_TEST_SECRET}" in out.stdout  # the dry run shows where it comes from
    assert secret not in out.stdout + out.stderr
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert files and not [p for p in files if secret in p.read_text(errors="replace")]
    assert readable_by_others(run_dir) == []
    # The saved recipe still runs the same: loaded where the variable is set, it resolves to the secret again.
    os.environ["FT_TEST_SECRET"] = secret
    try:
        again = recipe_mod.load(run_dir / "recipe.yaml")
    finally:
        del os.environ["FT_TEST_SECRET"]
    assert again.slurm.train.setup == [f"export HF_TOKEN={secret}"]
