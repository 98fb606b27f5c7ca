"""`make report` and `make status` (all runs): what a run did, read back from its TensorBoard events.

    write_report(run_dir)             runs/<name>/report.md + plots/*.png: loss, learning rate, throughput curves,
                                      final losses, tokens, time, GPU-hours, key settings, sample generations
    read_events(tensorboard_dir)      every scalar and text summary of a run, as plain Python lists
    run_summaries(runs_dir, stages)   one dict per run (stages' states, last losses, tokens/s) for `make status`

Tags are found by their last path component (`train/loss` -> loss in the train section), so the reader keeps working
when the trainer adds or renames a prefix. The training loop writes the events; this module only reads them.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

from ftlib.rundir import RunDir, read_json, write_atomic


# ----------------------------------------------------------------------------------------------------- events
class Point(NamedTuple):
    step: int
    value: float
    wall_time: float


@dataclass
class Events:
    scalars: Dict[str, List[Point]] = field(default_factory=dict)  # tag -> points, ascending step
    texts: Dict[str, List[tuple]] = field(default_factory=dict)  # tag -> [(step, text)], ascending step


def _event_dirs(tensorboard_dir: Path) -> List[Path]:
    """Folders holding event files: the TensorBoard folder itself and any sub-folder (one per writer)."""
    return sorted({p.parent for p in Path(tensorboard_dir).rglob("events.out.tfevents.*")})


def read_events(tensorboard_dir: str | os.PathLike) -> Events:
    """All scalars and text summaries under `tensorboard_dir`. When a step was logged twice (a resumed run repeats
    the steps after its last checkpoint), the later write wins."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    scalars: Dict[str, Dict[int, Point]] = {}
    texts: Dict[str, Dict[int, tuple]] = {}

    def keep(table, tag, step, wall_time, item):
        old = table.setdefault(tag, {}).get(step)
        if old is None or old[-1] <= wall_time:
            table[tag][step] = item + (wall_time,)

    for folder in _event_dirs(Path(tensorboard_dir)):
        # size_guidance 0 = keep every event (the default samples scalars down to 10,000 points).
        acc = ea.EventAccumulator(str(folder), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
        acc.Reload()
        tags = acc.Tags()
        for tag in tags.get("scalars", []):
            for e in acc.Scalars(tag):
                keep(scalars, tag, e.step, e.wall_time, (e.step, float(e.value)))
        for tag in tags.get("tensors", []):
            plugin = acc.SummaryMetadata(tag).plugin_data.plugin_name
            for e in acc.Tensors(tag):
                array = tensor_util.make_ndarray(e.tensor_proto)
                if plugin == "text":
                    name = tag[:-len("/text_summary")] if tag.endswith("/text_summary") else tag  # torch's suffix
                    text = "\n".join(x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)
                                     for x in array.reshape(-1))
                    keep(texts, name, e.step, e.wall_time, (e.step, text))
                elif plugin == "scalars":  # TF2-style scalar summaries are stored as tensors
                    keep(scalars, tag, e.step, e.wall_time, (e.step, float(array)))

    return Events(
        scalars={t: [Point(*v) for _, v in sorted(pts.items())] for t, pts in scalars.items()},
        texts={t: [(s, text) for s, (_, text, _) in sorted(items.items())] for t, items in texts.items()},
    )


# ----------------------------------------------------------------------------------------------------- tags
def _leaf(tag: str) -> str:
    return tag.rsplit("/", 1)[-1]


def _section(tag: str) -> str:
    return tag.rsplit("/", 1)[0] if "/" in tag else ""


def find_tag(events: Events, leaves: List[str], section: Optional[str] = None,
             pattern: Optional[str] = None) -> Optional[str]:
    """The scalar tag whose last component is one of `leaves` (or matches the regex `pattern`), optionally in a
    section containing `section`; with several candidates, the longest series (a time series beats a one-off)."""
    found = [t for t in events.scalars
             if (_leaf(t) in leaves or (pattern and re.search(pattern, _leaf(t))))
             and (section is None or section in _section(t))]
    return max(found, key=lambda t: (len(events.scalars[t]), -len(t)), default=None)


# What each curve / number is called in the events (see ftlib/train.py).
SERIES = {
    "train_loss": dict(leaves=["loss"], section="train"),
    "eval_loss": dict(leaves=["loss"], section="eval"),
    "learning_rate": dict(leaves=["learning_rate", "lr"]),
    "grad_norm": dict(leaves=["grad_norm"]),
    "tokens_per_s": dict(leaves=[], pattern=r"^(?!train_)(\w+_)?tokens_per_s(ec|econd)?$"),
    "tokens": dict(leaves=["tokens"], section="train"),  # non-padding tokens since the previous log, all ranks
    "tokens_seen": dict(leaves=[], pattern=r"tokens_seen$"),  # a running total, where a trainer logs one
    "padding_fraction": dict(leaves=[], pattern=r"padding"),
    "train_runtime": dict(leaves=["train_runtime"]),
}


def series(events: Events, name: str) -> List[Point]:
    tag = find_tag(events, **SERIES[name])
    return events.scalars[tag] if tag else []


def last(events: Events, name: str) -> Optional[float]:
    points = series(events, name)
    return points[-1].value if points else None


def sample_texts(events: Events) -> Dict[str, List[tuple]]:
    """Text summaries of sample generations (tags mentioning sample or generation), tag -> [(step, text)]."""
    return {t: v for t, v in events.texts.items() if re.search(r"sample|generation", t, re.I)}


# ----------------------------------------------------------------------------------------------------- plots
FIGURES = {
    "loss": ("Loss", "loss", ["train_loss", "eval_loss"]),
    "learning_rate": ("Learning rate", "learning rate", ["learning_rate"]),
    "throughput": ("Throughput (non-padding tokens per second, all ranks)", "tokens / s", ["tokens_per_s"]),
    "grad_norm": ("Gradient norm (before clipping)", "grad norm", ["grad_norm"]),
}


def plot(events: Events, plots_dir: str | os.PathLike) -> Dict[str, Dict[str, List[Point]]]:
    """One PNG per figure in `plots_dir` (figures without data are skipped). Returns what was drawn:
    figure name -> {series name: points}."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a login or compute node
    import matplotlib.pyplot as plt

    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    drawn = {}
    for name, (title, ylabel, names) in FIGURES.items():
        data = {n: series(events, n) for n in names if series(events, n)}
        if not data:
            continue
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for label, points in data.items():
            ax.plot([p.step for p in points], [p.value for p in points], marker="o" if len(points) < 30 else None,
                    markersize=3, label=label.replace("_", " "))
        ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if len(data) > 1:
            ax.legend()
        fig.tight_layout()
        tmp = plots_dir / f".{name}.tmp{os.getpid()}.png"
        fig.savefig(tmp, format="png")
        plt.close(fig)
        os.replace(tmp, plots_dir / f"{name}.png")  # a reader never sees half a PNG
        drawn[name] = data
    return drawn


# ----------------------------------------------------------------------------------------------------- summary
def _get(tree: dict, dotted: str):
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def load_recipe_dict(run: RunDir) -> dict:
    """The run's saved recipe as plain data (the report only shows values, so files it names need not exist)."""
    from omegaconf import OmegaConf

    if not run.recipe.is_file():
        raise FileNotFoundError(f"{run.root}: not a run directory (no recipe.yaml)")
    return OmegaConf.to_container(OmegaConf.load(run.recipe))


def summarize(run: RunDir, events: Events, recipe: dict, usage: Optional[dict] = None) -> Dict[str, object]:
    """The numbers at the top of the report. `usage`: what Slurm charged for the training job (elapsed_s, nodes,
    gpus, job_id; launcher.records.train_usage), None for a local run."""
    train_points = series(events, "train_loss")
    wall_times = [p.wall_time for pts in events.scalars.values() for p in pts]
    runtime = last(events, "train_runtime")
    train_s = runtime if runtime else (max(wall_times) - min(wall_times) if wall_times else None)
    counts = series(events, "tokens")  # one point per logged step (a resumed run's rewrite replaces the first)
    tokens_seen = sum(p.value for p in counts) if counts else last(events, "tokens_seen")
    throughput = series(events, "tokens_per_s")
    if tokens_seen and train_s:
        tokens_per_s, how = tokens_seen / train_s, "tokens seen / training time"
    else:  # the training log's own measure: non-padding tokens per second of training steps, all ranks
        tokens_per_s = _mean(throughput)
        how = "mean over the training logs"

    if usage:  # what the cluster charged: the whole job, start-up included
        elapsed_s, nodes, gpus = usage["elapsed_s"], int(usage["nodes"]), int(usage["gpus"])
        source = f"sacct, job {usage['job_id']}"
        resources = f"{_count(nodes, 'node')}, " + (f"{_count(gpus, 'GPU')} in all" if gpus else
                                                    f"{_count(int(usage.get('cpus', 0)), 'CPU')}, no GPU")
    else:  # a local run (or no accounting): the ranks are processes of this machine, one GPU each if it has GPUs
        stage = _get(recipe, "resources.train") or {}
        nodes, processes = 1, stage.get("nodes", 1) * stage.get("tasks_per_node", 1)
        gpus = processes if stage.get("gpus_per_node") else 0
        elapsed_s, source = train_s, "training time from the events"
        resources = f"{_count(processes, 'process', 'processes')} on 1 node, " + (
            f"{_count(gpus, 'GPU')}" if gpus else "CPU only")
    return {
        "steps": train_points[-1].step if train_points else None,
        "final_train_loss": last(events, "train_loss"),
        "final_eval_loss": last(events, "eval_loss"),
        "tokens_seen": tokens_seen,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_how": how,
        "padding_fraction": _mean(series(events, "padding_fraction")),
        "train_seconds": train_s,
        "elapsed_seconds": elapsed_s,
        "nodes": nodes,
        "gpus": gpus,
        "resources": resources,
        "gpu_hours": gpus * elapsed_s / 3600 if elapsed_s is not None else None,
        "gpu_hours_source": source,
    }


KEY_SETTINGS = [
    "model.name_or_path", "model.quantization", "model.dtype", "lora.r", "lora.alpha", "lora.target_modules",
    "data.sequence_len", "data.packing", "data.prompt_style", "train.global_batch_size", "train.micro_batch_size",
    "train.learning_rate", "train.lr_scheduler", "train.warmup_steps", "train.optimizer", "train.precision",
    "train.max_steps", "train.epochs", "deepspeed.enabled", "deepspeed.zero_stage", "resources.train.nodes",
    "resources.train.tasks_per_node", "resources.train.gpus_per_node", "run.seed",
]


def _mean(points: List[Point]) -> Optional[float]:
    return sum(p.value for p in points) / len(points) if points else None


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value != value or math.isinf(value):
            return str(value)
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return str(value)


def _count(n: int, one: str, many: Optional[str] = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "n/a"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _sample_section(events: Events) -> List[str]:
    samples = sample_texts(events)
    if not samples:
        return ["No sample generations were logged."]
    lines = []
    for tag, items in sorted(samples.items()):
        (first_step, first), (last_step, final) = items[0], items[-1]
        when = "before training" if first_step == 0 else "first logged"
        lines += [f"### `{tag}`", "", f"**Step {first_step}** ({when})", "", _quote(first), ""]
        if len(items) > 1:
            lines += [f"**Step {last_step}** (last logged)", "", _quote(final), ""]
    return lines


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in text.strip().splitlines()) or "> (empty)"


def _eval_section(run: RunDir) -> List[str]:
    results = read_json(run.eval_results)
    if not results:
        return ["Not evaluated yet: `make eval RUN=<this run>` compares the base model and the adapter."]
    rows = ["| model | loss | perplexity |", "|---|---|---|"]
    for name in ("base", "adapter"):
        r = results[name]
        rows.append(f"| {name} | {r['loss']:.4f} | {r['perplexity']:.2f} |")
    return [f"On {results['data']} ({results['examples']} examples, {results['tokens']:,} label tokens); "
            f"{results['loss_definition']}", "", *rows, "",
            f"Side-by-side generations: [eval/generations.md](eval/generations.md)"]


def write_report(run_dir: str | os.PathLike, usage: Optional[dict] = None) -> Path:
    """Write report.md and plots/*.png into the run directory; returns the report's path. `usage`: see summarize."""
    run = RunDir(run_dir)
    recipe = load_recipe_dict(run)
    if not _event_dirs(run.tensorboard):
        raise FileNotFoundError(f"{run.root}: no TensorBoard events in {run.tensorboard} (has training started?)")
    events = read_events(run.tensorboard)
    drawn = plot(events, run.plots)
    s = summarize(run, events, recipe, usage)

    padding = "n/a" if s["padding_fraction"] is None else f"{100 * s['padding_fraction']:.1f} %"
    lines = [f"# Run `{_get(recipe, 'run.name')}`", "", f"Run directory: `{run.root}`", "", "## Summary", "",
             "| | |", "|---|---|",
             f"| optimizer steps | {_fmt(s['steps'])} |",
             f"| final train loss | {_fmt(s['final_train_loss'])} |",
             f"| final eval loss | {_fmt(s['final_eval_loss'])} |",
             f"| tokens seen | {_fmt(s['tokens_seen'])} |",
             f"| tokens / s ({s['tokens_per_s_how']}) | {_fmt(s['tokens_per_s'])} |",
             f"| padding (share of token slots, mean over the training logs) | {padding} |",
             f"| training time | {_duration(s['train_seconds'])} |",
             f"| elapsed ({s['gpu_hours_source']}) | {_duration(s['elapsed_seconds'])} |",
             f"| GPU-hours (GPUs × elapsed; {s['resources']}) | {_fmt(s['gpu_hours'])} |",
             "", "## Key settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| `{key}` | `{_get(recipe, key)}` |" for key in KEY_SETTINGS]
    lines += ["", "## Curves", ""]
    lines += [f"![{name}](plots/{name}.png)\n" for name in drawn] or ["No scalar events were logged."]
    lines += ["## Sample generations (before and after training)", "", *_sample_section(events), "",
              "## Evaluation", "", *_eval_section(run), ""]
    write_atomic(run.report, "\n".join(lines))
    return run.report


# ----------------------------------------------------------------------------------------------------- all runs
def run_summaries(runs_dir: str | os.PathLike = "runs",
                  stage_states: Optional[Callable[[RunDir], Dict[str, dict]]] = None) -> List[Dict[str, object]]:
    """One dict per run under `runs_dir`: name, path, stages {stage: {job_id, launcher, state}}, last train/eval loss,
    tokens/s. `stage_states(run)` gives the stages (launcher.records.JobRecords(run).stage_states); without it
    they are {}."""
    out = []
    for recipe_file in sorted(Path(runs_dir).glob("*/recipe.yaml")):
        run = RunDir(recipe_file.parent)
        stages = stage_states(run) if stage_states else {}
        events = read_events(run.tensorboard) if _event_dirs(run.tensorboard) else Events()
        throughput = series(events, "tokens_per_s")
        out.append({"name": run.root.name, "path": str(run.root), "stages": stages,
                    "train_loss": last(events, "train_loss"), "eval_loss": last(events, "eval_loss"),
                    "tokens_per_s": throughput[-1].value if throughput else None,
                    "adapter": run.training_done})
    return out


# ----------------------------------------------------------------------------------------------------- a sweep
def write_sweep_report(folder: str | os.PathLike, rows: List[Dict[str, object]]) -> Path:
    """A sweep's report.md: its trials ranked best first (launcher.sweep.trial_rows: eval and train loss, tokens/s,
    GPU-hours, stopped early), one plot of every trial's eval-loss curve (plots/eval_loss.png), and the best trial's
    recipe to rerun or serve. Returns the report's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    plots = folder / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for row in rows:
        curve = row["eval_curve"]
        if curve:
            ax.plot([s for s, _ in curve], [v for _, v in curve], marker="o", markersize=3,
                    linestyle="--" if row["stopped_early"] else "-", label=row["name"])
    ax.set(title="eval loss of every trial (dashed: stopped early)", xlabel="optimizer step", ylabel="eval loss")
    ax.grid(alpha=0.3)
    if any(row["eval_curve"] for row in rows):
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = plots / f".eval_loss.tmp{os.getpid()}.png"
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, plots / "eval_loss.png")

    lines = [f"# Sweep `{folder.name}`", "", f"Folder: `{folder}`; {len(rows)} trials, best first.", "",
             "| rank | trial | state | final eval loss | final train loss | tokens / s | GPU-hours | stopped early |",
             "|---|---|---|---|---|---|---|---|"]
    for k, row in enumerate(rows, 1):
        lines.append(f"| {k} | `{row['name']}` | {row['state']} | {_fmt(row['eval_loss'])} | "
                     f"{_fmt(row['train_loss'])} | {_fmt(row['tokens_per_s'])} | {_fmt(row['gpu_hours'])} | "
                     f"{row['stopped_early'] or 'no'} |")
    finished = [row for row in rows if row["completed"]]
    lines += ["", "![eval loss of every trial](plots/eval_loss.png)", ""]
    if finished:
        best = folder / str(finished[0]["name"])
        lines += [f"**Best:** `{finished[0]['name']}` (eval loss {_fmt(finished[0]['eval_loss'])}).", "",
                  f"- rerun it: `make train RECIPE={best / 'recipe.yaml'}`",
                  f"- serve it: `make serve RUN={best}`, or every finished trial: `make serve RUN={folder}` "
                  f"(`BEST=1`: the best only)", ""]
    else:
        lines += ["No trial has finished yet.", ""]
    report = folder / "report.md"
    write_atomic(report, "\n".join(lines))
    return report
