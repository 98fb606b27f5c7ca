"""Where everything about one run lives. The only module that knows the layout of a run directory.

runs/<name>/
  recipe.yaml            the resolved recipe (rerun with `make train RECIPE=runs/<name>/recipe.yaml`)
  jobs.json              job ids and submitit folders of each stage
  sbatch/                the generated sbatch scripts (also written by DRY_RUN=1)
  logs/                  submitit folders: one per stage, stdout/stderr of every task
  deepspeed.json         the DeepSpeed configuration the training used
  tensorboard/           TensorBoard event files
  checkpoints/           Trainer/DeepSpeed checkpoints (checkpoint-<step>/)
  heartbeat/             while training: each rank's heartbeat; stalled.json when the watchdog ended a job
  adapter/               the LoRA adapter, PEFT format (+ trained.json: the step it was trained to)
  merged/                the merged full model (`make export`)
  endpoint.json          where the endpoint listens, while serving
  serve_token            the endpoint's API token (mode 600; endpoint.json names this file, never the token)
  serve_head.json        while a serve job runs: its Ray head's address and cluster token for the other nodes (mode 600)
  stopped.json           the last time training stopped on a signal: why (cancelled, time limit, ...), step, checkpoint
  rendezvous-<job>.json  while a training job's ranks meet: rank 0's port and the rendezvous's secret (mode 600)
  eval/                  `make eval`: results.json, generations.md
  report.md, plots/      `make report`

Other modules ask a RunDir for these paths (and for `training_done`) instead of spelling them.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Optional

from ftlib.errors import UserError


class RunDir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    @classmethod
    def of(cls, recipe) -> "RunDir":
        """The run directory of a loaded recipe (`run.dir` is always set, absolute, after ftlib.recipe.load)."""
        return cls(recipe.run.dir)

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
    stopped = property(lambda self: self.root / "stopped.json")  # the last stop of training by a signal, and why
    report = property(lambda self: self.root / "report.md")
    plots = property(lambda self: self.root / "plots")
    eval = property(lambda self: self.root / "eval")
    eval_results = property(lambda self: self.eval / "results.json")
    eval_generations = property(lambda self: self.eval / "generations.md")
    serve_log = property(lambda self: self.stage_logs("serve") / "local.log")  # a local endpoint's Ray/Serve log

    def rendezvous(self, attempt: str) -> Path:
        return self.root / f"rendezvous-{attempt}.json"

    def stage_logs(self, stage: str) -> Path:
        return self.logs / stage

    @property
    def training_done(self) -> bool:
        """The training stage is complete: the adapter folder appears only whole (see publish_dir)."""
        return (self.adapter / "adapter_config.json").is_file()


def write_atomic(path: str | os.PathLike, text: str, mode: int | None = None) -> None:
    """Write a file under a temporary name, then rename: readers see the old file or the whole new one. Its mode
    is `mode`, or what the process's umask allows (private by default, see use_private_files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")  # unique across nodes
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600 if mode is not None else 0o666)
    with os.fdopen(fd, "w") as f:
        if mode is not None:
            os.fchmod(f.fileno(), mode)
        f.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------- who may read
PRIVATE_UMASK, GROUP_UMASK = 0o077, 0o027


def use_private_files(recipe) -> None:
    """From now on, what this process (and every job it submits or starts: Slurm and child processes inherit the
    umask) creates is private to the user: folders 0700, files 0600. With run.group, the run directory and the data
    cache are shared read-only with that Unix group instead: umask 027, and both folders get the group and the
    set-group-id bit, so what is created inside them inherits the group. The libraries' caches and temporary files
    go into the user's private folder on this host (ftlib.private.use_private_caches).

    Checkpoints hold the adapter's weights and the tokenized cache holds the training data: on a shared cluster
    neither may be readable by other users unless the recipe says so."""
    from ftlib.private import use_private_caches

    group = getattr(recipe.run, "group", None)
    os.umask(GROUP_UMASK if group else PRIVATE_UMASK)
    use_private_caches()
    for folder in (Path(recipe.run.dir), Path(recipe.data.cache_dir)):
        folder.mkdir(parents=True, exist_ok=True)
        if folder.stat().st_uid != os.getuid():
            continue  # a shared cache someone else set up: its owner decides who reads it
        if group:
            import grp

            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise UserError(f"run.group: no Unix group named {group!r} on {socket.gethostname()}") from None
            os.chown(folder, -1, gid)
            folder.chmod(0o2750)
        else:
            folder.chmod(0o700)


def publish_dir(partial: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Put a folder written under a temporary name in place of `final` (replacing an older one), so readers see
    no folder or a whole one. Two renames: an old `final` is moved aside first, then removed."""
    partial, final = Path(partial), Path(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{socket.gethostname()}-{os.getpid()}")
        os.replace(final, old)
        shutil.rmtree(old)
    os.replace(partial, final)
    return final


def write_json(path: str | os.PathLike, data: Any, mode: int | None = None) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n", mode)


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default


# In adapter/: how far the adapter was trained ({"global_step", "max_steps", "epochs"}; ftlib.train writes it).
# Here, not in ftlib.train, so that `make train` checks a finished run without importing torch (6 s on a login node).
TRAINED = "trained.json"


def trained_steps(run: RunDir) -> Optional[int]:
    return (read_json(run.adapter / TRAINED) or {}).get("global_step")


def more_steps_asked(recipe) -> Optional[str]:
    """For a finished run: the line saying that the recipe now asks for more training than adapter/ has had (a
    larger train.max_steps or train.epochs), which continues from the run's last checkpoint; None otherwise."""
    run = RunDir.of(recipe)
    done = read_json(run.adapter / TRAINED)
    if not done:
        return None
    t = recipe.train
    if t.max_steps > 0 and t.max_steps > done["global_step"]:
        asked = f"train.max_steps={t.max_steps}"
    elif t.max_steps <= 0 and done.get("max_steps", -1) <= 0 and t.epochs > done.get("epochs", t.epochs):
        asked = f"train.epochs={t.epochs:g}"
    else:
        return None
    return (f"{run.adapter} was trained to step {done['global_step']} and the recipe now asks for {asked}: continuing "
            f"from the last checkpoint (the learning-rate schedule is the new length's from there on); the old adapter "
            f"is kept as adapter.step-{done['global_step']}")
