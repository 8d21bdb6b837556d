"""Facts about a run that its card reports and that cannot be recovered afterwards: where the
base model and the data came from (with content hashes for local files), the hardware and the
library versions; what the task found in the data (its class counts ...) it records itself. Collected while training and stored in metrics.json, so
`finetune card RUN_DIR` needs nothing but the run directory.
"""

from __future__ import annotations

import hashlib
import os
import platform
from importlib import metadata
from pathlib import Path

from finetune.recipe import DATA_FORMATS, Recipe
from finetune.sources import PACKAGE_PREFIX

VERSIONED = ("finetune", "torch", "transformers", "peft", "accelerate", "datasets", "evaluate", "timm", "diffusers",
             "huggingface_hub")


def describe_base_model(recipe: Recipe, source: str, hub_id: str | None = None) -> dict:
    """The base model as the card names it: a Hub id when it came from the Hub (the task's reading of
    model.name when it has one, see TaskModel.hub_id), where it was loaded from, and its license when known."""
    local = Path(source).is_dir()
    hub_id = None if local else hub_id or source
    return {
        "name": recipe.model.name,
        "hub_id": hub_id,
        "location": str(Path(source).resolve()) if local else hub_id,  # what a loader takes (a card's snippet)
        "origin": "package" if recipe.model.name.startswith(PACKAGE_PREFIX) else "local" if local else "hub",
        "license": _license(source if local else hub_id, recipe.model.revision, local),
    }


def _license(source: str, revision: str | None, local: bool) -> str | None:
    """The base model's license from its own card: the local README.md, else a cached or fetched one."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    if local:
        readme = Path(source) / "README.md"
    else:
        cached = try_to_load_from_cache(source, "README.md", revision=revision)
        readme = Path(cached) if isinstance(cached, str) else None
    try:
        if readme is not None and readme.is_file():
            return ModelCard.load(readme).data.license
        if not local and os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes"):
            from huggingface_hub import model_info

            info = model_info(source, revision=revision, timeout=10)
            return (info.card_data or {}).get("license")
    except Exception:  # an unreadable card or no network: the license is simply unknown
        return None
    return None


def describe_data(recipe: Recipe, splits, *, eval_carved: bool, task_facts: dict) -> dict:
    """Source and file hashes; `task_facts` is what the task recorded about the data (Task.data_facts)."""
    data, folder = recipe.data, recipe.data_folder
    facts: dict = {
        "source": None if folder else data.path,  # a Hub dataset id, which the card links
        "eval_carved_from_train": eval_carved,
        "recipe_dir": str(recipe.base_dir.resolve()),  # what relative data paths mean: predict / evaluate rebuild splits
    }
    if task_facts:
        facts["task"] = task_facts
    if folder:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        facts["folder"] = {
            "name": folder.name,
            "format": splits["train"].info.builder_name or "local folder",
            "files": len(files),
            "sha256": _folder_sha256(folder, files),
        }
    if data.files:
        facts["files"] = {
            split: {
                "name": Path(file).name,
                "format": DATA_FORMATS[Path(file).suffix.lower()],
                "sha256": _sha256(recipe.resolve(file)),
            }
            for split, file in data.files.items()
        }
    return facts


def _folder_sha256(folder: Path, files: list[Path]) -> str:
    """One digest of a folder's contents: every file's relative path and its sha256, in order."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(folder).as_posix()}\0{_sha256(path)}\n".encode())
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_environment(accelerator) -> dict:
    import torch

    if accelerator.device.type == "cuda":
        hardware = f"{accelerator.num_processes} × {torch.cuda.get_device_name(accelerator.device)}"
    else:
        hardware = f"CPU ({_cpu_name()}, {os.cpu_count()} cores)"
    return {
        "hardware": hardware,
        "processes": accelerator.num_processes,
        "python": platform.python_version(),
        "versions": _versions(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict:
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions
