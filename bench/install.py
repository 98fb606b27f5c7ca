"""Building the environments with pip and with uv, cold and warm cache, measured side by side in one run.

    python3 bench/install.py [--envs train serve] [--installers pip uv] [--rounds 1]

Each build is a real `env/setup.sh` (INSTALLER=pip or uv) into a fresh folder in a private temporary directory
under /tmp, with the installers' caches there too (PIP_CACHE_DIR, UV_CACHE_DIR; uv itself is installed by pip,
inside the uv figures):

  cold   empty caches: every wheel downloaded (or read from the site's mirror), DeepSpeed's sdist built
  warm   the same caches again, into a new folder: what a second checkout, or a rebuild, costs

The site's pip settings apply as they are (pip.conf, PIP_*: here local mirrors beside PyPI); uv gets them through
env/uv_pip.py. Local mirror files come from the page cache once read, for both installers alike; PyPI downloads are
real. With several rounds the order of the installers alternates, and the table gives each cell's fastest round
(the machine may be shared: the load average is printed beside every build) with its CPU time (user + system of
every process, which other load hardly changes). Everything it builds is deleted as it goes.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(which: str, installer: str, venv: Path, caches: Path, log: Path) -> dict:
    """One env/setup.sh run; wall and CPU seconds, size, and whether it finished (its stamp)."""
    env = {**os.environ, "INSTALLER": installer, "PIP_CACHE_DIR": str(caches / "pip"),
           "UV_CACHE_DIR": str(caches / "uv"), "VENV" if which == "train" else "SERVE_VENV": str(venv)}
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    with open(log, "w") as out:
        done = subprocess.run(["bash", str(ROOT / "env" / "setup.sh"), which], env=env, stdout=out,
                              stderr=subprocess.STDOUT)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    ok = done.returncode == 0 and (venv / ".ftlib-setup").is_file()
    used = log.read_text().splitlines()
    if not ok:
        print(f"  FAILED ({done.returncode}); the end of its output:\n    " + "\n    ".join(used[-15:]), flush=True)
    elif installer == "uv" and not any(line.endswith("with uv") for line in used):
        ok = False  # setup.sh fell back to pip: not a uv figure
        print("  setup.sh did not use uv: " + " / ".join(used[-3:]), flush=True)
    size = subprocess.run(["du", "-sm", str(venv)], capture_output=True, text=True).stdout.split()[0] \
        if venv.exists() else "0"
    return {"wall": wall, "cpu": cpu, "load": load, "gb": int(size) / 1024, "ok": ok}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["train", "serve"], choices=["train", "serve"])
    parser.add_argument("--installers", nargs="+", default=["pip", "uv"], choices=["pip", "uv"])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()

    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start; pip settings:", flush=True)
    print("  " + subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                                text=True).stdout.strip().replace("\n", "\n  "), flush=True)
    results = {}  # (env, installer, cache) -> [result, ...]
    with tempfile.TemporaryDirectory(prefix="ftlib-bench-install-") as tmp:
        tmp = Path(tmp)
        for round_ in range(args.rounds):
            for which in args.envs:
                order = args.installers if round_ % 2 == 0 else list(reversed(args.installers))
                for installer in order:
                    caches = tmp / f"cache-{which}-{installer}"
                    for cache in ("cold", "warm"):
                        venv = tmp / f"venv-{which}-{installer}-{cache}"
                        print(f"round {round_ + 1}: {which} with {installer}, {cache} cache ...", flush=True)
                        r = build(which, installer, venv, caches, tmp / f"{which}-{installer}-{cache}.log")
                        print(f"  {r['wall']:.0f} s (CPU {r['cpu']:.0f} s), {r['gb']:.1f} GB, "
                              f"load {r['load']:.1f}", flush=True)
                        results.setdefault((which, installer, cache), []).append(r)
                        shutil.rmtree(venv, ignore_errors=True)
                    shutil.rmtree(caches, ignore_errors=True)

    print(f"\nload average {os.getloadavg()[0]:.1f} at the end. Fastest of {args.rounds} round(s), seconds "
          f"(CPU seconds); ratio = pip / uv:\n")
    print("| environment | cache | pip | uv | pip / uv |")
    print("|---|---|---|---|---|")
    for which in args.envs:
        for cache in ("cold", "warm"):
            cells, best = [], {}
            for installer in ("pip", "uv"):
                runs = [r for r in results.get((which, installer, cache), []) if r["ok"]]
                if runs:
                    best[installer] = min(runs, key=lambda r: r["wall"])
                    cells.append(f"{best[installer]['wall']:.0f} ({best[installer]['cpu']:.0f})")
                else:
                    cells.append("n/a")
            ratio = (f"{best['pip']['wall'] / best['uv']['wall']:.1f}x "
                     f"(CPU {best['pip']['cpu'] / best['uv']['cpu']:.1f}x)" if len(best) == 2 else "n/a")
            name = {"train": ".venv", "serve": ".venv-serve"}[which]
            print(f"| {name} | {cache} | {cells[0]} | {cells[1]} | {ratio} |")


if __name__ == "__main__":
    main()
