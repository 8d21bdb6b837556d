"""`finetune compare RECIPE`: the recipe run once per variant (methods × grid values), each variant a normal
run directory under `<run dir>/compare/<variant>/`, then one report (finetune/compare_report.py).

Each variant is the `finetune run` command line it prints: the recipe with the user's `--set` overrides, then
`method.name`, the method's options, the grid's values and `output.dir`, run in a process of its own (so that its
peak memory is its own, and `--processes N` launches it exactly as `finetune run` does) with `--resume auto`:

- a variant whose directory holds the finished run of the same recipe is skipped;
- an interrupted one resumes from its latest complete checkpoint (or starts afresh when it has none);
- one whose directory holds a run of another recipe is an error naming the variant and the changed keys, unless
  `--overwrite` is given, which reruns it from scratch.

Method options: the recipe's `method.options` go to each method whose `Options` declares them (LoRA's `r` is not
given to `full`), and a grid key under `method.options` applies only to the methods that declare it; a grid key
no chosen method declares is an error. Every variant's recipe is validated before any of them runs. A compare
never pushes (`hub.push=false`): the variants would overwrite each other's repo.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import yaml

from finetune.errors import FinetuneError

SKIPPED, RESUMED, STARTED, RERUN = "skipped (finished)", "resumed", "started", "rerun (--overwrite)"
METHOD_OPTIONS = "method.options."
FORBIDDEN_GRID = {"method.name": "--methods", "output.dir": "--set output.dir=DIR (the compare goes into DIR/compare/)"}


@dataclass
class Grid:
    key: str
    values: list
    texts: list[str]
    """The values as the user wrote them (for names and --set)."""


@dataclass
class Variant:
    name: str
    method: str
    settings: dict = field(default_factory=dict)
    """Grid key → value text, only the keys that apply to this method."""
    overrides: list[str] = field(default_factory=list)
    """The `--set` overrides that make this variant from the recipe (the user's first)."""
    run_dir: Path = Path(".")
    recipe_yaml: str = ""
    status: str = ""


def parse_grid(option: str) -> Grid:
    """`--grid KEY=V1,V2,...`: the values are read as YAML scalars, as `--set` reads them."""
    from finetune.recipe import parse_yaml

    key, sep, values = option.partition("=")
    key = key.strip()
    texts = [v.strip() for v in values.split(",")] if sep else []
    if not key or not texts or not all(texts):
        raise FinetuneError(f"--grid {option!r}: expected KEY=V1,V2,... (e.g. --grid method.options.r=4,8,16); "
                            "the values are separated by commas and none may be empty.")
    if key in FORBIDDEN_GRID:
        raise FinetuneError(f"--grid {key}: a compare sets this itself; use {FORBIDDEN_GRID[key]} instead.")
    if len(set(texts)) != len(texts):
        raise FinetuneError(f"--grid {key}: a value is repeated ({', '.join(texts)}); give each value once.")
    return Grid(key, [parse_yaml(t) for t in texts], texts)


def plan(recipe_path: Path, methods: list[str], grids: list[Grid], overrides: list[str]) -> tuple[object, list[Variant]]:
    """The recipe as given (validated) and its variants, each validated as `finetune run` would; every problem of
    every variant is reported at once, before anything runs."""
    from finetune.recipe import apply_overrides, load_recipe, read_recipe_file

    _check_overrides(overrides)
    base = load_recipe(recipe_path, overrides)
    methods = methods or [base.method.name]
    if len(set(methods)) != len(methods):
        raise FinetuneError(f"--methods: a method is repeated ({', '.join(methods)}); name each once.")
    if len({g.key for g in grids}) != len(grids):
        raise FinetuneError("--grid: the same key is given twice; list all its values in one --grid KEY=V1,V2.")
    declared = {m: _option_names(m) for m in methods}
    for grid in grids:
        if grid.key.startswith(METHOD_OPTIONS) and not _applies(grid.key, methods, declared):
            raise FinetuneError(
                f"--grid {grid.key}: none of the methods compared ({', '.join(methods)}) has the option "
                f"'{grid.key[len(METHOD_OPTIONS):].split('.')[0]}'. A grid key under method.options applies only to the "
                "methods that declare it; check its spelling or add such a method to --methods."
            )
    raw, _ = read_recipe_file(Path(recipe_path))
    given_options = (apply_overrides(raw, list(overrides)).get("method") or {}).get("options") or {}
    compare_dir = base.run_dir / "compare"
    variants, problems = [], []
    for method in methods:
        applicable = [g for g in grids if _applies(g.key, [method], declared)]
        for values in product(*[g.texts for g in applicable]) if applicable else [()]:
            settings = dict(zip([g.key for g in applicable], values))
            variant = Variant(_name(method, settings, grids), method, settings)
            variant.run_dir = compare_dir / variant.name
            options = {k: v for k, v in given_options.items() if k in declared[method]}
            kept = [o for o in overrides if o.partition("=")[0].strip() != "output.dir"]  # the variant has its own
            variant.overrides = [*kept, f"method.name={method}",
                                 f"method.options={yaml.safe_dump(options, default_flow_style=True, width=10**6).strip()}",
                                 *[f"{k}={v}" for k, v in settings.items()], f"output.dir={variant.run_dir}", "hub.push=false"]
            try:
                variant.recipe_yaml = load_recipe(recipe_path, variant.overrides).to_yaml()
            except FinetuneError as exc:
                problems.append(f"variant {variant.name}: {exc}")
            variants.append(variant)
    _check_names(variants)
    if problems:
        raise FinetuneError("Some variants are not valid recipes, so nothing ran:\n" + "\n".join(problems))
    return base, variants


def applicability(grids: list[Grid], methods: list[str]) -> list[str]:
    """A line for each method.options grid key that some compared methods do not have."""
    methods = list(dict.fromkeys(methods))
    declared = {m: _option_names(m) for m in methods}
    notes = []
    for grid in grids:
        left_out = [m for m in methods if not _applies(grid.key, [m], declared)]
        if left_out:
            used = [m for m in methods if m not in left_out]
            notes.append(f"--grid {grid.key} applies to {', '.join(used)} only ({', '.join(left_out)} "
                         f"{'has' if len(left_out) == 1 else 'have'} no such option: one variant each).")
    return notes


def _check_overrides(overrides: list[str]) -> None:
    """`--set output.dir=DIR` moves the whole compare (to DIR/compare/); the method is the compare's to set."""
    for item in overrides:
        if item.partition("=")[0].strip() == "method.name":
            raise FinetuneError("--set method.name: a compare sets it for each variant; name the methods with --methods.")


def _option_names(method: str) -> set[str]:
    from finetune import plugins

    try:
        return set(plugins.load(plugins.METHODS, method).Options.model_fields)
    except FinetuneError as exc:
        raise FinetuneError(f"--methods: {exc}") from None


def _applies(key: str, methods: list[str], declared: dict) -> bool:
    """A method.options key applies to the methods that declare it; any other key applies to every method."""
    if not key.startswith(METHOD_OPTIONS):
        return True
    option = key[len(METHOD_OPTIONS):].split(".")[0]
    return any(option in declared[m] for m in methods)


def _name(method: str, settings: dict, grids: list[Grid]) -> str:
    """`lora-r8`, `full-lr0.001`: the method, then each grid setting as its last key part and value; the whole
    key path when two grid keys end alike. Only letters, digits, '.', '_' and '-'."""
    lasts = [g.key.rsplit(".", 1)[-1] for g in grids]
    parts = [method]
    for key, value in settings.items():
        last = key.rsplit(".", 1)[-1]
        parts.append((last if lasts.count(last) == 1 else key.replace(".", "_")) + value)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts))


def _check_names(variants: list[Variant]) -> None:
    names = [v.name for v in variants]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise FinetuneError(f"--grid: the variants' names clash ({', '.join(clash)}): values that differ only in "
                            "characters a folder name cannot hold. Write the values differently.")


def check_variants(variants: list[Variant], *, overwrite: bool) -> None:
    """Each variant's status (skipped, resumed, started, rerun), before any runs: a variant whose folder holds a
    run of another recipe is an error naming the variant and the keys, unless `overwrite`."""
    from finetune.rundir import RunLayout
    from finetune.training.checkpoint import latest_checkpoint

    changed = []
    for variant in variants:
        layout = RunLayout(variant.run_dir)
        if layout.finished_with(variant.recipe_yaml):
            variant.status = SKIPPED
            continue
        keys = layout.changed_keys(variant.recipe_yaml) if layout.recipe.is_file() else []
        if keys or (not layout.recipe.is_file() and layout.root.is_dir() and any(layout.root.iterdir())):
            if not overwrite:
                changed.append(f"{variant.name} ({', '.join(keys) or 'not a run directory'})")
            variant.status = RERUN
        else:
            variant.status = RESUMED if latest_checkpoint(layout.checkpoints) is not None else STARTED
    if changed:
        raise FinetuneError(
            f"The recipe of some variants changed since they ran: {'; '.join(changed)}. Rerun them from scratch with "
            "--overwrite (finished variants of the same recipe are still skipped), or restore the recipe and --set "
            "overrides they ran with."
        )


def run_command(recipe_path: Path, variant: Variant, *, processes: int | None, cpu: bool) -> list[str]:
    """The `finetune run` command line of one variant."""
    arguments = ["run", str(Path(recipe_path).resolve())]
    for override in variant.overrides:
        arguments += ["--set", override]
    arguments += ["--overwrite"] if variant.status == RERUN else ["--resume", "auto"]
    if processes:
        arguments += ["--processes", str(processes)]
    return arguments + (["--cpu"] if cpu else [])


def run_variant(recipe_path: Path, variant: Variant, *, processes: int | None, cpu: bool) -> int:
    """Run one variant as `finetune run` in its own process; its exit status."""
    command = [sys.executable, "-m", "finetune", *run_command(recipe_path, variant, processes=processes, cpu=cpu)]
    return subprocess.run(command, check=False).returncode


def failure(variant: Variant, status: int) -> FinetuneError:
    return FinetuneError(
        f"variant {variant.name}: `finetune run` ended with status {status} (its own message is above). Fix the cause "
        "and run the same `finetune compare` command again: finished variants are skipped and an interrupted one "
        "resumes from its checkpoint."
    )


def shell_line(arguments: list[str]) -> str:
    import shlex

    return "finetune " + " ".join(shlex.quote(a) for a in arguments)


class Stopped(FinetuneError):
    """A variant's run was stopped by a signal, resumably: the compare stops with it (exit status 75)."""


def compare(recipe_path: Path, methods: list[str], grid_options: list[str], overrides: list[str], *,
            processes: int | None = None, cpu: bool = False, overwrite: bool = False, dry_run: bool = False,
            echo=print) -> Path | None:
    """Run every variant that is not finished yet, one after the other, then write the report; returns report.md
    (None for a dry run, which lists the variants and their commands and runs nothing)."""
    from finetune.compare_report import primary_metric, read_row, write_report

    grids = [parse_grid(option) for option in grid_options]
    base, variants = plan(recipe_path, methods, grids, list(overrides))
    check_variants(variants, overwrite=overwrite)
    for note in applicability(grids, [v.method for v in variants]):
        echo(note)
    commands = {v.name: shell_line(run_command(recipe_path, v, processes=processes, cpu=cpu)) for v in variants}
    for variant in variants:
        echo(f"{variant.name}: {variant.status} → {variant.run_dir}" + ("" if variant.status == SKIPPED else f"\n  {commands[variant.name]}"))
    if dry_run:
        return None
    for variant in variants:
        if variant.status == SKIPPED:
            continue
        echo(f"\n== {variant.name} ({variant.status}) ==")
        status = run_variant(recipe_path, variant, processes=processes, cpu=cpu)
        if status == 75:
            raise Stopped(f"variant {variant.name} was stopped by a signal after a checkpoint. Run the same "
                          "`finetune compare` command again: finished variants are skipped and this one resumes.")
        if status != 0:
            raise failure(variant, status)
    rows = [read_row(v) for v in variants]
    splits = {primary_metric(json_summary(v.run_dir)) for v in variants}
    if len(splits) != 1:
        raise FinetuneError(f"The variants do not report the same metric on the same split ({sorted(splits)}): "
                            "a grid key changed eval.metrics or the data. Compare those in separate compares.")
    split, metric = splits.pop()
    return write_report(base.run_dir / "compare", rows, recipe_path=str(recipe_path), split=split, metric=metric,
                        commands=commands)


def json_summary(run_dir: Path) -> dict:
    import json

    return json.loads((Path(run_dir) / "metrics.json").read_text())
