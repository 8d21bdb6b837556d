"""The plugin registry: task and method plugins found through Python entry points.

The built-in plugins are registered in this project's own pyproject.toml, exactly as a third
party registers theirs, and are found the same way. Only the plugins a recipe names are
imported; one that fails to import is reported with its distribution and the reason, and
does not stop anything that does not need it.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from finetune.errors import PluginError

TASKS = "finetune.tasks"
METHODS = "finetune.methods"
_KIND = {TASKS: "task", METHODS: "method"}


def available(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


@functools.cache
def load(group: str, name: str):
    """Import the plugin `name` of `group` and check it against the contract."""
    from finetune.api import check_plugin

    found = available(group)
    kind = _KIND[group]
    if name not in found:
        lowered = {n.lower(): n for n in found}
        hint = difflib.get_close_matches(name.lower(), list(lowered), n=1)
        suggestion = f" Did you mean '{lowered[hint[0]]}'?" if hint else ""
        installed = ", ".join(sorted(found)) or "none"
        raise PluginError(
            f"unknown {kind} '{name}'.{suggestion} Installed {kind}s: {installed}. "
            f"A {kind} is added by installing a package that declares it under the '{group}' entry point."
        )
    ep = found[name]
    try:
        plugin = ep.load()
    except Exception as exc:
        raise PluginError(
            f"the {kind} '{name}' from the distribution {_dist(ep)} failed to import "
            f"({ep.value}): {type(exc).__name__}: {exc}"
        ) from exc
    missing = check_plugin(plugin, kind)
    if missing:
        raise PluginError(
            f"the {kind} '{name}' from the distribution {_dist(ep)} ({ep.value}) does not meet the "
            f"{kind} contract: " + "; ".join(missing)
        )
    return plugin


@dataclass
class PluginInfo:
    kind: str
    name: str
    distribution: str
    version: str
    error: str | None


def inventory() -> list[PluginInfo]:
    """Every installed plugin, loaded, with the reason for each one that fails."""
    rows = []
    for group in (TASKS, METHODS):
        for name, ep in sorted(available(group).items()):
            try:
                load(group, name)
                error = None
            except PluginError as exc:
                error = str(exc)
            dist = ep.dist
            rows.append(
                PluginInfo(_KIND[group], name, dist.name if dist else "?", dist.version if dist else "?", error)
            )
    return rows


def _dist(ep: EntryPoint) -> str:
    return f"'{ep.dist.name} {ep.dist.version}'" if ep.dist else "(unknown)"
