"""Pre-staging for sites whose compute nodes have no network: `make stage RECIPE=x.yaml` on the login node.

Every hub name in the recipe — model.name_or_path, model.tokenizer, each data.sources[].path — is fetched once
into a shared folder (models and tokenizers as hub snapshots, data sets saved with `datasets.save_to_disk`), and a
recipe that names the local copies instead is written beside them. Jobs of that recipe never reach for the hub, so
compute nodes can run with HF_HUB_OFFLINE=1. A job that would still need the network stops at its start with one
line saying which key and what to run (`offline_problems`).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import List, Tuple

from ftlib.errors import UserError


def hub_names(recipe) -> List[Tuple[str, str]]:
    """[(recipe key, hub name)] of everything the recipe would download. Loading a recipe makes every local path
    absolute, so a name that is not absolute is a hub name."""
    found = [("model.name_or_path", recipe.model.name_or_path), ("model.tokenizer", recipe.model.tokenizer)]
    found += [(f"data.sources[{i}].path", s.path) for i, s in enumerate(recipe.data.sources)]
    return [(key, name) for key, name in found if name and not os.path.isabs(name)]


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def offline_problems(recipe) -> List[str]:
    """What a job of `recipe` would download although this node is offline (HF_HUB_OFFLINE=1)."""
    if not offline():
        return []
    return [f"{key}: {name!r} is a hub name and this node is offline (HF_HUB_OFFLINE=1); stage it on the login "
            f"node first: make stage RECIPE=<this recipe>" for key, name in hub_names(recipe)]


def check_offline(recipe) -> None:
    problems = offline_problems(recipe)
    if problems:
        raise UserError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def stage(recipe, into: Path) -> Path:
    """Fetch the recipe's hub names into `into` and write `into/<run.name>.yaml`, the same recipe with local paths.
    Returns that recipe's path."""
    from ftlib import recipe as recipe_mod

    into = Path(into).resolve()
    staged = copy.deepcopy(recipe)
    for key, name in hub_names(recipe):
        local = _fetch(key, name, recipe, into)
        if key.startswith("data.sources["):
            staged.data.sources[int(key.split("[")[1].split("]")[0])].path = str(local)
        else:
            setattr(staged.model, key.split(".")[1], str(local))
        print(f"[stage] {key}: {name} -> {local}")
    path = into / f"{recipe.run.name}.yaml"
    recipe_mod.save(staged, path)
    return path


def _fetch(key: str, name: str, recipe, into: Path) -> Path:
    safe = name.replace("/", "__")
    try:
        if key.startswith("data.sources["):
            import datasets

            source = recipe.data.sources[int(key.split("[")[1].split("]")[0])]
            local = into / "datasets" / safe / source.split
            if not (local / "dataset_info.json").is_file():
                datasets.load_dataset(name, split=source.split).save_to_disk(str(local))
            return local
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_dir=into / "models" / safe))
    except Exception as e:  # offline, unknown repository, no permission (gated model: `huggingface-cli login`)
        why = " ".join(str(e).split())[:300]
        raise UserError(f"{key}: cannot fetch {name!r} from the hub: {type(e).__name__}: {why}") from None
