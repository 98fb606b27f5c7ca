"""The first five minutes: `make demo` in a fresh clone with empty caches, up to its first answer.

    python3 bench/first_run.py [--refs REF [REF ...]] [--installer auto|pip|uv] [--log-dir DIR]

For each REF (default: HEAD) of this checkout, one after the other: `git clone` it into a private temporary
directory and run `make demo` there as a new user would, with every cache empty (XDG_CACHE_HOME: uv's and pip's
caches, DeepSpeed's JIT-built op in torch_extensions, matplotlib's font cache), timing each line it prints. Two refs
(e.g. the commit before a change, and HEAD) give a before/after side by side. The site's pip settings (pip.conf,
PIP_*) apply as they are; local mirror files come from the page cache once read.

Printed per ref: the environment set-up (until the demo's first line), each stage, the first answer (the
notebook-format reply) and the whole run, in seconds, with the load average, since the machine may be shared.
Everything is deleted afterwards.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKS = [  # (what, the start of the line that ends it)
    ("environment set-up", "demo: run directory"),
    ("preprocessing", "[preprocess] done"),
    ("training (2 DeepSpeed ranks)", "[train] done"),
    ("first answer", "[serve] POST / (the notebook's format):"),
    ("whole demo", "demo finished."),
]


def run(ref: str, tmp: Path, installer: str, log_dir: Path = None) -> dict:
    clone = tmp / f"clone-{ref.replace('/', '_')}"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "--quiet", "--detach", ref], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TORCH_EXTENSIONS_DIR")}
    env.update(XDG_CACHE_HOME=str(tmp / f"cache-{ref.replace('/', '_')}"), INSTALLER=installer, HF_HUB_OFFLINE="1")
    env.pop("UV_CACHE_DIR", None)
    env.pop("PIP_CACHE_DIR", None)
    load = os.getloadavg()[0]
    marks, lines = {}, []
    started = time.monotonic()
    process = subprocess.Popen(["make", "demo"], cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    for line in process.stdout:
        now = time.monotonic() - started
        lines.append(f"{now:7.1f} {line.rstrip()}")
        for what, start in MARKS:
            if what not in marks and line.lstrip().startswith(start):
                marks[what] = now
    process.wait()
    if process.returncode != 0:
        print("\n".join(lines[-30:]))
        raise SystemExit(f"make demo failed at {ref} (exit {process.returncode})")
    if log_dir:
        (log_dir / f"first-run-{ref.replace('/', '_')}.log").write_text("\n".join(lines) + "\n")
    return {"marks": marks, "load": load, "end_load": os.getloadavg()[0],
            "commit": subprocess.run(["git", "-C", str(clone), "log", "--oneline", "-1"], capture_output=True,
                                     text=True).stdout.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refs", nargs="+", default=["HEAD"])
    parser.add_argument("--installer", default="auto", choices=["auto", "pip", "uv"])
    parser.add_argument("--log-dir", type=Path, help="keep each run's output there, every line timed")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="ftlib-bench-first-run-") as tmp:
        for ref in args.refs:
            print(f"{ref}: fresh clone, empty caches, make demo ...", flush=True)
            results[ref] = run(ref, Path(tmp), args.installer, args.log_dir)
            r = results[ref]
            print(f"  {r['commit']}\n  " + ", ".join(f"{w} {t:.0f} s" for w, t in r["marks"].items()) +
                  f" (load {r['load']:.1f} -> {r['end_load']:.1f})", flush=True)
    print(f"\nSeconds from `make demo` in a fresh clone ({os.cpu_count()} CPUs):\n")
    print("| until | " + " | ".join(args.refs) + " |")
    print("|---|" + "---|" * len(args.refs))
    for what, _ in MARKS:
        cells = [f"{results[ref]['marks'][what]:.0f}" if what in results[ref]["marks"] else "n/a" for ref in args.refs]
        print(f"| {what} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
