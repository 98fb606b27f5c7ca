"""Where everything about one run lives. The only module that knows the layout of a run directory.

runs/<name>/
  recipe.yaml            the resolved recipe (rerun with `make train RECIPE=runs/<name>/recipe.yaml`)
  jobs.json              job ids and submitit folders of each stage
  sbatch/                the generated sbatch scripts (also written by DRY_RUN=1)
  logs/                  submitit folders: one per stage, stdout/stderr of every task
  deepspeed.json         the DeepSpeed configuration the training used
  tensorboard/           TensorBoard event files
  checkpoints/           Trainer/DeepSpeed checkpoints (checkpoint-<step>/)
  adapter/               the LoRA adapter, PEFT format
  merged/                the merged full model (`make export`)
  endpoint.json          where the endpoint listens, while serving
  serve_token            the endpoint's API token (mode 600; endpoint.json names this file, never the token)
  serve_head.json        while a serve job runs: its Ray head's address and cluster token for the other nodes (mode 600)
  report.md, plots/      `make report`
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any


class RunDir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    @classmethod
    def of(cls, recipe) -> "RunDir":
        return cls(recipe.run_dir)

    # Files and folders of a run.
    recipe = property(lambda self: self.root / "recipe.yaml")
    jobs = property(lambda self: self.root / "jobs.json")
    sbatch = property(lambda self: self.root / "sbatch")
    logs = property(lambda self: self.root / "logs")
    deepspeed = property(lambda self: self.root / "deepspeed.json")
    tensorboard = property(lambda self: self.root / "tensorboard")
    checkpoints = property(lambda self: self.root / "checkpoints")
    adapter = property(lambda self: self.root / "adapter")
    merged = property(lambda self: self.root / "merged")
    endpoint = property(lambda self: self.root / "endpoint.json")
    token = property(lambda self: self.root / "serve_token")
    serve_head = property(lambda self: self.root / "serve_head.json")
    report = property(lambda self: self.root / "report.md")
    plots = property(lambda self: self.root / "plots")
    eval = property(lambda self: self.root / "eval")

    def stage_logs(self, stage: str) -> Path:
        return self.logs / stage

    def exists(self) -> bool:
        return self.recipe.is_file()


def write_atomic(path: str | os.PathLike, text: str, mode: int | None = None) -> None:
    """Write a file under a temporary name, then rename: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")  # unique across nodes
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if mode is None else mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    if mode is None:
        os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, data: Any, mode: int | None = None) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n", mode)


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default
