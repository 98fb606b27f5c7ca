"""The adapters an endpoint serves, by name, and loading one more into a running endpoint.

`AdapterRegistry` is one Ray actor per serve job (named, created by the first replica that asks): {served name:
local folder}. It starts with the recipe's adapters (served_adapters) and grows with `POST /admin/adapters`. Every
replica asks it, whatever the engine: the ingress for /v1/models and for a model name it does not know yet; the HF
engine loads a registered adapter into its PEFT model before the batch that first needs it; vLLM's replicas resolve
an adapter name to its folder through it (Ray Serve's LoRA multiplexing then loads it into the engine). Folders must
be visible from every node of the job (a shared filesystem, as a run directory is).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Optional

import ray

REGISTRY = "ftlib_adapters"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # no ':' (vLLM's adapter ids are base:adapter) nor '/'


class AdapterError(ValueError):
    """An adapter that cannot be served (one line, for the client)."""


def check_adapter(name: str, path: str, base_path: str, max_rank: Optional[int] = None) -> dict:
    """The adapter's PEFT config, once `name` and the folder at `path` are known to be servable on `base_path`."""
    if not NAME.match(name or ""):
        raise AdapterError(f"name: {name!r} is not a servable name (letters, digits, '.', '_', '-'; up to 64)")
    folder = Path(path)
    if not folder.is_absolute():
        raise AdapterError(f"path: must be an absolute path on the serve nodes, got {path!r}")
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"path: no adapter_config.json in {path} (a PEFT adapter folder is expected)")
    if not any((folder / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise AdapterError(f"path: no adapter_model.safetensors in {path}")
    config = json.loads(config_file.read_text())
    base = config.get("base_model_name_or_path")
    if base and Path(base).name != Path(base_path).name:
        raise AdapterError(f"path: the adapter was trained on {base}, not on the served base model {base_path}")
    if max_rank is not None and int(config.get("r", 0)) > max_rank:
        raise AdapterError(f"path: the adapter's rank {config.get('r')} is over serve.max_lora_rank ({max_rank})")
    return config


@ray.remote(num_cpus=0)
class AdapterRegistry:
    def __init__(self, adapters: Dict[str, str]):
        self.adapters = dict(adapters)

    def all(self) -> Dict[str, str]:
        return dict(self.adapters)

    def add(self, name: str, path: str) -> bool:
        """True if added; False if the name is taken (by this very folder or another)."""
        if name in self.adapters:
            return False
        self.adapters[name] = path
        return True


def registry(adapters: Dict[str, str]):
    """The job's registry actor (created with `adapters` by whoever asks first). Detached: it outlives the replica
    that created it and goes with the job's Ray cluster."""
    return AdapterRegistry.options(name=REGISTRY, get_if_exists=True, lifetime="detached").remote(adapters)
