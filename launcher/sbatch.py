"""Recipe -> the sbatch script of a stage. Pure functions: tests/test_launch.py checks them against golden files."""
from __future__ import annotations

import sys
from typing import Dict, Optional

from submitit.slurm.slurm import _make_sbatch_string

from ftlib.rundir import RunDir
from launcher.stages import STAGES, Stage
from launcher.task import task_command


def slurm_parameters(recipe, stage: Stage | str, dependency: Optional[str] = None) -> Dict:
    """submitit SlurmExecutor parameters of one stage: its resources (`resources.<stage>`) and the site's
    settings for it (`slurm.<stage>`)."""
    stage = STAGES[stage] if isinstance(stage, str) else stage
    r, site = stage.resources(recipe), stage.site(recipe)
    params = {
        "job_name": f"{recipe.run.name}-{stage.name}",
        "time": r.time_min,
        "nodes": r.nodes,
        "ntasks_per_node": stage.tasks_per_node(recipe),
        "cpus_per_task": r.cpus_per_task,
        "array_parallelism": r.array_parallelism,
        "signal_delay_s": r.stop_signal_s,
        "setup": list(site.setup),
        # One task dying (OOM, a signal, an exception) ends the whole step at once, rather than leaving the
        # others blocked in a collective until the time limit; `make status` then names the task that died first.
        "srun_args": ["--kill-on-bad-exit=1"],
    }
    optional = {"partition": site.partition, "account": site.account, "qos": site.qos, "constraint": site.constraint,
                "mem": f"{int(r.mem_gb * 1024)}M" if r.mem_gb else None,
                "exclusive": True if r.exclusive else None, "dependency": dependency, **gpu_parameters(r, site)}
    params.update({k: v for k, v in optional.items() if v is not None})
    extra = dict(site.additional)
    if dependency:
        # Without this, a job whose dependency failed stays PENDING (DependencyNeverSatisfied) forever.
        extra.setdefault("kill-on-invalid-dep", "yes")
    if extra:
        params["additional_parameters"] = extra
    return params


def gpu_parameters(r, site) -> Dict:
    """The GPU request spelled as the site wants it (slurm.<stage>.gpu_request)."""
    if not r.gpus_per_node:
        return {}
    typed = f"{site.gpu_type}:" if site.gpu_type else ""
    if site.gpu_request == "gres":
        return {"gres": f"gpu:{typed}{r.gpus_per_node}"}
    if site.gpu_request == "gpus_per_task":  # one task per GPU (the recipe checks tasks_per_node == gpus_per_node)
        return {"gpus_per_task": f"{typed}1" if typed else 1}
    return {"gpus_per_node": f"{typed}{r.gpus_per_node}" if typed else r.gpus_per_node}


def render_sbatch(recipe, stage: Stage | str, dependency: Optional[str] = None,
                  array_size: Optional[int] = None) -> str:
    """The sbatch script submitit submits for a stage."""
    stage = STAGES[stage] if isinstance(stage, str) else stage
    folder = RunDir.of(recipe).stage_logs(stage.name)
    command = task_command(sys.executable, folder)
    return _make_sbatch_string(command=command, folder=folder, map_count=array_size,
                               **slurm_parameters(recipe, stage, dependency))
