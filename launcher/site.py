"""What the Slurm site allows, checked before anything of a chain is submitted.

Every stage's script goes through `sbatch --test-only` first (Slurm validates account, partition, QOS, time and
size limits and starts nothing). A refusal becomes one line that names the stage, the recipe setting, Slurm's
reason and what the site allows for you (from sacctmgr, sinfo and scontrol), e.g.

  [train] slurm.train.account=nope refused by Slurm (Invalid account or account/partition combination specified);
  your accounts: ftl, ftlib
"""
from __future__ import annotations

import getpass
import os
import re
import shutil
import subprocess
import tempfile
from typing import List, Optional

from ftlib.errors import UserError


class SiteError(UserError):
    """The site refused a stage's settings; the message names the setting and what is allowed."""


def check(recipe, stage, script: str) -> None:
    """Raise SiteError if Slurm would refuse `script` (the stage's sbatch text)."""
    if not shutil.which("sbatch"):
        return
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", prefix="ftlib-check-") as f:
        f.write(script)
        f.flush()
        out = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise SiteError(explain(recipe, stage, out.stderr))


def explain(recipe, stage, stderr: str) -> str:
    """Slurm's refusal of a stage, as one line naming the recipe setting and what the site allows."""
    reason = _reason(stderr)
    site, r = stage.site(recipe), stage.resources(recipe)
    key = f"slurm.{stage.section or stage.name}"
    low = reason.lower()
    if "maxwall" in low or "timelimit" in low:  # Slurm 22.05: QOSMaxWallDurationPerJobLimit, PartitionTimeLimit
        said = f"resources.{stage.section or stage.name}.time_min={r.time_min}"
        allowed = _time_limits(site.partition, site.qos)
    elif "policy" in low or "submit limit" in low or "maxsubmit" in low:
        said = f"{key}.qos={site.qos or '(default)'} (job count, size or time limits)"
        allowed = _qos_limits(site.qos)
    elif "time limit" in low:
        said = f"resources.{stage.section or stage.name}.time_min={r.time_min}"
        allowed = _time_limits(site.partition, site.qos)
    elif "account" in low:
        said = f"{key}.account={site.account}"
        allowed = f"your accounts: {', '.join(_associations('account')) or 'none (ask your admin)'}"
    elif "partition" in low:
        said = f"{key}.partition={site.partition}"
        allowed = f"partitions: {', '.join(_partitions()) or '?'}"
    elif "qos" in low:
        said = f"{key}.qos={site.qos}"
        allowed = f"your QOS: {', '.join(_associations('qos')) or '?'}"
    elif "node" in low:
        said = f"resources.{stage.section or stage.name}.nodes={r.nodes} (tasks_per_node={r.tasks_per_node}, mem_gb={r.mem_gb})"
        allowed = f"partition {site.partition or _default_partition()}: {_partition_field(site.partition, 'Nodes')}"
    else:
        said, allowed = f"the {stage.name} stage's settings", "see `sbatch --test-only` with the dry run's script"
    return f"[{stage.name}] {said} refused by Slurm ({reason}); {allowed}"


def _reason(stderr: str) -> str:
    """Slurm's sentence, with its reason code when it gives one. `sbatch --test-only` (22.05) says e.g.
    "sbatch: error: QOSMaxWallDurationPerJobLimit" then "allocation failure: Job violates accounting/QOS policy
    (...)"; a real submission says "Batch job submission failed: ..." instead of "allocation failure: "."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    texts = [re.sub(r"^(sbatch: )?(error: )?(allocation failure: |Batch job submission failed: )?", "", line)
             for line in lines]
    codes = [t for t in texts if re.fullmatch(r"[A-Z][A-Za-z]+Limit", t)]
    sentences = [t for t in texts if t not in codes]
    text = (sentences or codes or ["no reason given"])[-1]
    return f"{text}: {codes[-1]}" if codes and sentences else text


def _run(cmd: List[str]) -> str:
    if not shutil.which(cmd[0]):
        return ""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _associations(field: str) -> List[str]:
    """This user's accounts or QOS in Slurm's accounting."""
    user = os.environ.get("USER") or getpass.getuser()
    out = _run(["sacctmgr", "-n", "-P", "show", "assoc", f"user={user}", f"format={field}"])
    return sorted({v for line in out.splitlines() for v in line.split(",") if v})


def _partitions() -> List[str]:
    return sorted(set(_run(["sinfo", "-h", "-o", "%R"]).split()))


def _default_partition() -> str:
    return next((p.rstrip("*") for p in _run(["sinfo", "-h", "-o", "%P"]).split() if p.endswith("*")), "")


def _partition_field(partition: Optional[str], name: str) -> str:
    text = _run(["scontrol", "show", "partition", partition or _default_partition(), "-o"])
    found = re.search(rf"\b{name}=(\S+)", text)
    return found.group(1) if found else "?"


def _qos_limits(qos: Optional[str]) -> str:
    names = [qos] if qos else _associations("qos")
    out = _run(["sacctmgr", "-n", "-P", "show", "qos", *names, "format=name,maxwall,maxsubmitjobsperuser,"
                "maxjobsperuser,maxtresperjob"])
    limits = []
    for line in out.splitlines():
        name, wall, submit, running, tres = (line.split("|") + [""] * 5)[:5]
        parts = [f"max wall {wall}" if wall else "", f"max {submit} jobs submitted" if submit else "",
                 f"max {running} running" if running else "", f"max {tres} per job" if tres else ""]
        limits.append(f"QOS {name}: {', '.join(p for p in parts if p) or 'no limits'}")
    return "; ".join(limits) or "QOS limits unknown"


def _time_limits(partition: Optional[str], qos: Optional[str]) -> str:
    return (f"partition {partition or _default_partition()} allows MaxTime={_partition_field(partition, 'MaxTime')}"
            f"; {_qos_limits(qos)}")
