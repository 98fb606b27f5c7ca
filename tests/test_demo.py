"""`make demo` end to end, on a tiny schedule: local array preprocessing, 2-process DeepSpeed LoRA training,
a local Ray Serve endpoint, one notebook-format request and one OpenAI-style completion."""
import subprocess
import sys

import pytest
import torch

from ftlib.rundir import RunDir
from tests.conftest import ROOT, TINY_MODEL


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "ftlib", "demo", f"run.dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}",
         "train.max_steps=8", "train.eval_steps=4", "train.save_steps=4", "train.logging_steps=2"],
        capture_output=True, text=True, cwd=ROOT, timeout=880)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "[preprocess] 2 of 2 tasks as a local array" in text
    assert "[serve] POST / (the notebook's format):" in text and "[serve] POST /v1/completions" in text
    assert f"Run directory: {run_dir}" in text and "make tensorboard" in text

    run = RunDir(run_dir)
    assert run.recipe.is_file() and run.deepspeed.is_file()
    # Two ranks trained: each wrote its own log in the train stage's folder.
    assert len(list(run.stage_logs("train").glob("*_0_log.out"))) == 1
    assert len(list(run.stage_logs("train").glob("*_1_log.out"))) == 1

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in run.tensorboard.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "eval/loss"} <= tags, tags

    # The adapter loads with PEFT and changes the model's output.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    ids = torch.tensor([[1, 403, 407, 261, 378, 280, 1030 % 512, 300]])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, run.adapter)
        after = tuned(ids).logits
    assert not torch.allclose(before, after, atol=1e-4)
    assert not run.endpoint.exists() or '"stopped"' in run.endpoint.read_text()  # the endpoint was shut down
