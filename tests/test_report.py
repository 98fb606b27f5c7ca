"""make report / make status: plots and numbers read back from real TensorBoard event files.

The event files here are written with torch's SummaryWriter under the tag names ftlib/train.py uses (the HF
TensorBoardCallback's train/* and eval/*, plus tokens_per_second, padding_fraction and samples/<i> text);
tests/test_evaluate.py also builds a report from a real training run.
"""
import json
import struct

import pytest

from ftlib import recipe as recipe_mod
from ftlib import report
from ftlib.rundir import RunDir, write_json
from launcher import records

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_trainer_like_events(tb_dir, steps=40, log_every=5, eval_every=20, start=0):
    """Events shaped like a training run's: logged every `log_every` steps, evaluated every `eval_every`."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tb_dir))
    for step in range(start + log_every, steps + 1, log_every):
        writer.add_scalar("train/loss", 6.0 - 0.1 * step, step)
        writer.add_scalar("train/learning_rate", 3e-3 * (1 - step / steps), step)
        writer.add_scalar("train/grad_norm", 1.0 + 0.01 * step, step)
        writer.add_scalar("train/epoch", step / 100, step)
        writer.add_scalar("train/tokens_per_second", 1000.0 + step, step)
        writer.add_scalar("train/padding_fraction", 0.25, step)
        if step % eval_every == 0:
            writer.add_scalar("eval/loss", 6.5 - 0.1 * step, step)
            writer.add_scalar("eval/runtime", 1.5, step)
            for i in range(2):
                writer.add_text(f"samples/{i}", f"**prompt {i}**\n\nanswer at step {step}", step)
    writer.add_scalar("train/train_runtime", 80.0, steps)
    writer.add_scalar("train/train_loss", 4.0, steps)
    writer.close()


def make_run(make_recipe, launcher="local", job_id="local-1"):
    recipe = make_recipe()
    run = RunDir.of(recipe)
    recipe_mod.save(recipe, run.recipe)
    write_json(run.jobs, {"stages": {"train": {"job_id": job_id, "launcher": launcher}}})
    return recipe, run


def accumulator_scalars(tb_dir, tag):
    """The (step, value) pairs TensorBoard's own reader finds, independent of ftlib.report."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, pytest.approx(e.value)) for e in acc.Scalars(tag)]


def assert_valid_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width >= 300 and height >= 200
    from PIL import Image

    with Image.open(path) as image:
        image.verify()  # checks the chunks' CRCs and that the stream decodes
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0.01, f"{path} is blank"


@pytest.mark.timeout(120)
def test_report_plots_and_summary_come_from_the_events(make_recipe):
    recipe, run = make_run(make_recipe)
    write_trainer_like_events(run.tensorboard)

    path = report.write_report(run.root)

    assert path == run.report
    text = path.read_text()
    for name in ("loss", "learning_rate", "throughput", "grad_norm"):
        assert_valid_png(run.plots / f"{name}.png")
        assert f"(plots/{name}.png)" in text
    assert not list(run.plots.glob(".*")), "temporary plot files left behind"

    # The plotted series are exactly what TensorBoard reads from the event files.
    drawn = report.plot(report.read_events(run.tensorboard), run.plots)
    for figure, label, tag in [("loss", "train_loss", "train/loss"), ("loss", "eval_loss", "eval/loss"),
                               ("learning_rate", "learning_rate", "train/learning_rate"),
                               ("throughput", "tokens_per_s", "train/tokens_per_second")]:
        assert [(p.step, p.value) for p in drawn[figure][label]] == accumulator_scalars(run.tensorboard, tag)
    assert [p.step for p in drawn["loss"]["eval_loss"]] == [20, 40]

    # Summary numbers and settings.
    assert "| final train loss | 2 |" in text  # 6.0 - 0.1 * 40
    assert "| final eval loss | 2.5 |" in text
    assert "| training time | 1:20 |" in text  # train/train_runtime
    assert "| padding (share of token slots, mean over the training logs) | 25.0 % |" in text
    assert "| optimizer steps | 40 |" in text
    assert f"| `train.learning_rate` | `{recipe.train.learning_rate}` |" in text
    assert "| `lora.r` | `8` |" in text
    # The demo recipe's local run: 2 ranks (2 nodes x 1 task) were 2 processes on this one machine, no GPU.
    assert "| GPU-hours (GPUs × elapsed; 2 processes on 1 node, CPU only) | 0 |" in text
    mean_tps = sum(1000.0 + s for s in range(5, 41, 5)) / 8
    assert f"| tokens / s (mean over the training logs) | {mean_tps:,.0f} |" in text
    # First and last sample generations of each prompt.
    assert "### `samples/0`" in text and "### `samples/1`" in text
    assert "> answer at step 20" in text and "> answer at step 40" in text
    assert "Not evaluated yet" in text


def test_tokens_seen_add_up_the_logged_counts(make_recipe):
    """The training log's train/tokens (non-padding tokens since the previous log, all ranks) add up to the tokens
    seen, and tokens / s is that over the training time. A resumed run logs the steps after its checkpoint again:
    each step counts once, with the later count."""
    from torch.utils.tensorboard import SummaryWriter

    _, run = make_run(make_recipe, job_id="local-2")
    first = SummaryWriter(str(run.tensorboard))
    for step in (5, 10, 15):  # preempted after step 15, resumed from the step-10 checkpoint
        first.add_scalar("train/tokens", 999.0, step)
        first.add_scalar("train/loss", 3.0, step)
    first.close()
    second = SummaryWriter(str(run.tensorboard))
    for step in (15, 20):
        second.add_scalar("train/tokens", 1000.0 + step, step)
        second.add_scalar("train/loss", 2.0, step)
    second.add_scalar("train/train_runtime", 4.0, 20)
    second.close()

    seen = 999.0 * 2 + 1015.0 + 1020.0
    assert report.summarize(run, report.read_events(run.tensorboard), {})["tokens_seen"] == pytest.approx(seen)
    text = report.write_report(run.root).read_text()
    assert f"| tokens seen | {seen:,.0f} |" in text
    assert f"| tokens / s (tokens seen / training time) | {seen / 4:,.0f} |" in text


def test_report_includes_eval_results(make_recipe):
    recipe, run = make_run(make_recipe)
    write_trainer_like_events(run.tensorboard, steps=10, eval_every=10)
    write_json(run.eval / "results.json", {
        "data": "the run's eval split", "examples": 26, "tokens": 4321,
        "loss_definition": "token-weighted mean cross-entropy over response tokens.",
        "base": {"loss": 3.5, "perplexity": 33.12}, "adapter": {"loss": 2.25, "perplexity": 9.49}})
    text = report.write_report(run.root).read_text()
    assert "| base | 3.5000 | 33.12 |" in text
    assert "| adapter | 2.2500 | 9.49 |" in text
    assert "(eval/generations.md)" in text


def test_resumed_run_keeps_the_later_events(make_recipe):
    """A run resumed from its step-20 checkpoint rewrites steps 25..40 in a second event file; the report shows
    the resumed attempt's values, once per step."""
    from torch.utils.tensorboard import SummaryWriter

    _, run = make_run(make_recipe)
    first = SummaryWriter(str(run.tensorboard))
    for step in range(5, 31, 5):
        first.add_scalar("train/loss", 10.0, step)
    first.close()
    write_trainer_like_events(run.tensorboard, start=20)  # steps 25..40, written later
    points = report.series(report.read_events(run.tensorboard), "train_loss")
    assert [p.step for p in points] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [p.value for p in points[4:]] == pytest.approx([6.0 - 0.1 * s for s in (25, 30, 35, 40)])


def test_report_without_events_says_so(make_recipe):
    _, run = make_run(make_recipe)
    with pytest.raises(FileNotFoundError, match="no TensorBoard events"):
        report.write_report(run.root)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        report.write_report(run.root / "nowhere")


def test_tags_are_found_by_suffix():
    events = report.Events(scalars={t: [report.Point(1, 1.0, 0.0)] for t in (
        "train/loss", "train/train_loss", "eval/loss", "eval/runtime", "train/learning_rate",
        "train/tokens_per_second", "train/train_tokens_per_second", "perf/num_input_tokens_seen")})
    assert report.find_tag(events, **report.SERIES["train_loss"]) == "train/loss"
    assert report.find_tag(events, **report.SERIES["eval_loss"]) == "eval/loss"
    assert report.find_tag(events, **report.SERIES["tokens_per_s"]) == "train/tokens_per_second"
    assert report.find_tag(events, **report.SERIES["tokens_seen"]) == "perf/num_input_tokens_seen"
    assert report.find_tag(events, **report.SERIES["grad_norm"]) is None


def test_slurm_accounting_fields():
    assert records.parse_elapsed("00:01:30") == 90
    assert records.parse_elapsed("1-02:00:00") == 26 * 3600
    assert records.parse_elapsed("12:05") == 725
    assert records.parse_tres("billing=16,cpu=16,gres/gpu=8,mem=64G,node=2") == {"cpu": 16, "gpu": 8, "node": 2}
    assert records.parse_tres("cpu=4,gres/gpu:a100=4,gres/gpu=4,node=1")["gpu"] == 4
    assert records.parse_tres("cpu=2,mem=3G,node=2") == {"cpu": 2, "node": 2}


def test_run_summaries_for_make_status(make_recipe, tmp_path):
    runs = tmp_path / "runs"
    trained = make_recipe(f"run.dir={runs / 'alpha'}", "run.name=alpha")
    recipe_mod.save(trained, RunDir.of(trained).recipe)
    write_json(RunDir.of(trained).jobs, {"stages": {
        "preprocess": {"job_id": "12", "launcher": "slurm"}, "train": {"job_id": "13", "launcher": "slurm"}}})
    write_trainer_like_events(RunDir.of(trained).tensorboard)
    fresh = make_recipe(f"run.dir={runs / 'beta'}", "run.name=beta")
    recipe_mod.save(fresh, RunDir.of(fresh).recipe)
    (runs / "not-a-run").mkdir()

    asked = []

    def job_states(ids):  # the shape of launcher.records.job_states: array tasks appear as <id>_<k>
        asked.append(ids)
        return {"12_0": "COMPLETED", "12_1": "FAILED", "13": "PENDING"}

    summaries = report.run_summaries(runs, lambda run: records.JobRecords(run).stage_states(job_states))
    assert [s["name"] for s in summaries] == ["alpha", "beta"]
    alpha, beta = summaries
    assert asked == [["12", "13"]]
    assert alpha["stages"]["preprocess"]["state"] == "FAILED"  # the worst task of the array
    assert alpha["stages"]["train"]["state"] == "PENDING"
    assert alpha["train_loss"] == pytest.approx(2.0) and alpha["eval_loss"] == pytest.approx(2.5)
    assert alpha["tokens_per_s"] == pytest.approx(1040.0)
    assert beta["stages"] == {} and beta["train_loss"] is None
    json.dumps(summaries)  # plain data, printable as JSON


def _slurm_cluster_up() -> bool:
    import shutil
    import subprocess

    if not shutil.which("sbatch"):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slurm
@pytest.mark.skipif(not _slurm_cluster_up(), reason="no Slurm cluster (tests/cluster/up.sh starts one)")
@pytest.mark.timeout(240)
def test_gpu_hours_of_a_slurm_run_come_from_sacct(make_recipe, tmp_path):
    """A real job on the test cluster: elapsed, nodes and GPUs are read back from Slurm's accounting."""
    import subprocess

    done = subprocess.run(["sbatch", "--parsable", "--wait", "-N", "1", "-n", "1", "--time=2", "--mem=100M",
                           f"--output={tmp_path / 'job.out'}", "--wrap", "sleep 3"],
                          capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip().split(";")[0]
    usage = records.usage(job_id)
    assert usage is not None and usage["nodes"] == 1 and usage["gpus"] == 0 and usage["cpus"] >= 1
    assert 3 <= usage["elapsed_s"] < 60

    _, run = make_run(make_recipe, launcher="slurm", job_id=job_id)
    write_trainer_like_events(run.tensorboard, steps=10, eval_every=10)
    text = report.write_report(run.root, usage=records.train_usage(run)).read_text()
    assert f"sacct, job {job_id}" in text
    cpus = int(usage["cpus"])
    assert f"(GPUs × elapsed; 1 node, {cpus} CPU{'s' if cpus > 1 else ''}, no GPU) | 0 |" in text
