"""The plugin registry: task, method and metric plugins found through Python entry points.

The built-in plugins are registered in this project's own pyproject.toml, exactly as a third
party registers theirs, and are found the same way. Only the plugins a recipe names are
imported; one that fails to import is reported with its distribution and the reason, and
does not stop anything that does not need it.

A metric plugin is an `evaluate` module (a .py file defining an `evaluate.Metric`), registered
by its module name; `evaluate.load` runs it from its file, so no network is involved.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from finetune.errors import PluginError

TASKS = "finetune.tasks"
METHODS = "finetune.methods"
METRICS = "finetune.metrics"
_KIND = {TASKS: "task", METHODS: "method", METRICS: "metric"}


def available(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


@functools.cache
def load(group: str, name: str):
    """Import the plugin `name` of `group`, check it against the contract, and give it the defaults of
    the optional members it leaves out (finetune.api.BaseTask / BaseMethod)."""
    from finetune.api import check_plugin, with_defaults

    ep = _entry_point(group, name)
    kind = _KIND[group]
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
    return with_defaults(plugin, kind)


def metric_file(name: str) -> Path | None:
    """The file of the metric module registered as `name`, found without importing it (metric
    modules import `evaluate`, which is slow); None when no installed package registers `name`."""
    ep = available(METRICS).get(name)
    if ep is None:
        return None
    problem = None
    if ep.attr:
        problem = "the entry point must name a module (package.module), not an object in it"
    else:
        try:
            spec = importlib.util.find_spec(ep.module)
        except (ImportError, ValueError) as exc:
            spec, problem = None, f"{type(exc).__name__}: {exc}"
        if problem is None and (spec is None or not spec.origin or not spec.origin.endswith(".py")):
            problem = f"no Python module '{ep.module}' is installed"
    if problem:
        raise PluginError(f"the metric '{name}' from the distribution {_dist(ep)} ({ep.value}) cannot be used: {problem}")
    return Path(spec.origin)


def _entry_point(group: str, name: str) -> EntryPoint:
    found = available(group)
    if name in found:
        return found[name]
    kind = _KIND[group]
    lowered = {n.lower(): n for n in found}
    hint = difflib.get_close_matches(name.lower(), list(lowered), n=1)
    suggestion = f" Did you mean '{lowered[hint[0]]}'?" if hint else ""
    installed = ", ".join(sorted(found)) or "none"
    raise PluginError(
        f"unknown {kind} '{name}'.{suggestion} Installed {kind}s: {installed}. "
        f"A {kind} is added by installing a package that declares it under the '{group}' entry point."
    )


@dataclass
class PluginInfo:
    kind: str
    name: str
    distribution: str
    version: str
    error: str | None


def inventory() -> list[PluginInfo]:
    """Every installed plugin, loaded (metrics only located), with the reason for each one that fails."""
    rows = []
    for group in (TASKS, METHODS, METRICS):
        for name, ep in sorted(available(group).items()):
            try:
                metric_file(name) if group == METRICS else load(group, name)
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
