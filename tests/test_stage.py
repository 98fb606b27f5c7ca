"""`make stage`: a recipe for offline compute nodes, and one line when a job would still need the network."""
import subprocess
import sys

import pytest

from ftlib import recipe as recipe_mod
from ftlib.errors import UserError
from ftlib.stage import check_offline, hub_names
from launcher import jobs
from tests.conftest import DEMO, ROOT


def ftlib(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ftlib", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, env=env)


def test_a_local_recipe_stages_to_itself(tmp_path):
    out = ftlib("stage", str(DEMO), f"run.dir={tmp_path / 'run'}", "--into", str(tmp_path / "hub"))
    assert out.returncode == 0, out.stderr
    assert "a local path already" in out.stdout and "make train RECIPE=" in out.stdout
    staged = recipe_mod.load(tmp_path / "hub" / "demo.yaml")
    original = recipe_mod.load(DEMO, [f"run.dir={tmp_path / 'run'}"])
    assert staged.model.name_or_path == original.model.name_or_path and hub_names(staged) == []
    assert [s.path for s in staged.data.sources] == [s.path for s in original.data.sources]


def test_hub_names_on_an_offline_node_are_one_line_errors(make_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = make_recipe("model.name_or_path=some-org/some-model", "data.sources[0].path=some-org/some-data")
    assert hub_names(recipe) == [("model.name_or_path", "some-org/some-model"),
                                 ("data.sources[0].path", "some-org/some-data")]
    with pytest.raises(UserError, match=r"^model.name_or_path: 'some-org/some-model' is a hub name and this node "
                                        r"is offline \(HF_HUB_OFFLINE=1\); stage it .*make stage.* \(and 1 more\)$"):
        check_offline(recipe)
    with pytest.raises(UserError, match="is a hub name and this node is offline"):  # a job stops at its start
        jobs.preprocess_shard(recipe, 0, 2)
    # Staging itself needs the hub: here it is out of reach, and says so in one line.
    out = ftlib("stage", str(DEMO), "model.name_or_path=some-org/some-model", f"run.dir={tmp_path / 'run'}",
                "--into", str(tmp_path / "hub"))
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("error: model.name_or_path: cannot fetch 'some-org/some-model' from the hub"), \
        out.stderr
