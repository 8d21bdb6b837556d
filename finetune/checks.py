"""`finetune check RECIPE`: everything that can fail, found before anything trains.

A check is a function `(CheckContext) -> Section`: a titled table for the reader, findings (errors,
warnings, notes) and the same facts as plain data for `--json`. `CHECKS` lists them in the order the
report shows them; `FAST_CHECKS` are the ones `finetune run` runs by itself before it loads a model.
No check loads weights: the data is read, models are built from their configs on the meta device.

Exit codes: 0 nothing to report, 1 an error, WARNINGS_ONLY when only warnings were found.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from finetune.errors import FinetuneError

if TYPE_CHECKING:
    from datasets import DatasetDict

    from finetune.recipe import Recipe

WARNINGS_ONLY = 4
"""`finetune check`'s exit status when it found warnings but no error (1 is an error, 2 click's usage error)."""

CHECKS = [
    "finetune.data_report:data_check",
    "finetune.leakage:leakage_check",
    "finetune.estimate:adapter_check",
    "finetune.estimate:memory_check",
    "finetune.checks:hub_check",
]
FAST_CHECKS = ["finetune.estimate:adapter_check", "finetune.checks:hub_check"]
"""What `finetune run` checks before it starts: seconds, no data pass (the run audits leakage itself, data.deduplicate)."""


@dataclass
class Finding:
    level: Literal["error", "warning", "note"]
    message: str
    """One paragraph: what is wrong, where (the recipe key, the file, the split), how to fix it."""
    key: str | None = None
    """The recipe key it concerns (data.deduplicate, method.options.target_modules), if one."""


@dataclass
class Section:
    title: str
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    facts: dict = field(default_factory=dict)
    """The section's numbers as plain data, for --json and metrics.json."""
    skipped: str | None = None
    """Why the check could not run (it needs the Hub, the task does not support it)."""


class CheckContext:
    """What every check reads, each built once and only when a check asks: the plugins, the data splits as the
    run would make them, the model source."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    @cached_property
    def task(self):
        from finetune import plugins

        return plugins.load(plugins.TASKS, self.recipe.task.name)(self.recipe.task_options)

    @cached_property
    def method(self):
        from finetune import plugins

        return plugins.load(plugins.METHODS, self.recipe.method.name)(self.recipe.method_options)

    @cached_property
    def splits(self) -> DatasetDict:
        """train / eval / test as a run makes them (task.prepare_data, the eval split carved, the sample caps)."""
        from finetune.data import finish_splits, load_splits

        return finish_splits(self.task.prepare_data(load_splits(self.recipe)), self.recipe, self.task.stratify_column)

    @cached_property
    def source(self) -> str:
        from finetune.sources import resolve_model_source

        return resolve_model_source(self.recipe.model.name, self.recipe.base_dir)

    def hub_needed(self) -> str | None:
        """What of the recipe lives on the Hub while the Hub is switched off (HF_HUB_OFFLINE), or None."""
        import os
        from pathlib import Path

        from huggingface_hub import constants

        if not constants.HF_HUB_OFFLINE:
            return None
        data = self.recipe.data
        needed = []
        if not data.files and not self.recipe.data_folder:
            needed.append(f"data.path '{data.path}' is a Hub dataset")
        try:
            if not Path(os.path.expanduser(self.source)).is_dir():
                needed.append(f"model.name '{self.recipe.model.name}' is a Hub model")
        except FinetuneError:
            pass
        return "; ".join(needed) or None


@dataclass
class CheckReport:
    recipe: str
    sections: list[Section]

    @property
    def findings(self) -> list[Finding]:
        return [f for section in self.sections for f in section.findings]

    @property
    def exit_code(self) -> int:
        levels = {f.level for f in self.findings}
        return 1 if "error" in levels else WARNINGS_ONLY if "warning" in levels else 0

    def to_json(self) -> dict:
        return {"recipe": self.recipe, "exit_code": self.exit_code,
                "sections": [asdict(section) for section in self.sections]}

    def render(self, console) -> None:
        from rich.table import Table

        for section in self.sections:
            if section.skipped:
                console.print(f"[bold]{section.title}[/bold]: not checked ({section.skipped})")
                continue
            if section.rows:
                table = Table(title=section.title, title_justify="left", title_style="bold")
                for column in section.columns:
                    table.add_column(column)
                for row in section.rows:
                    table.add_row(*(_cell(value) for value in row))
                console.print(table)
            else:
                console.print(f"[bold]{section.title}[/bold]")
            for finding in section.findings:
                style = {"error": "bold red", "warning": "yellow", "note": "dim"}[finding.level]
                console.print(f"  [{style}]{finding.level}[/{style}]: {finding.message}", highlight=False)
        errors = sum(f.level == "error" for f in self.findings)
        warnings = sum(f.level == "warning" for f in self.findings)
        console.print(f"{self.recipe}: {errors} errors, {warnings} warnings")


def run_checks(recipe: Recipe, names: list[str] | None = None, recipe_name: str = "") -> CheckReport:
    """Run the checks named (default: all of CHECKS), in order. A check that raises a FinetuneError becomes its
    section's error; the data errors a run would stop on are found this way too."""
    context = CheckContext(recipe)
    sections = []
    for name in names or CHECKS:
        module, function = name.split(":")
        check = getattr(importlib.import_module(module), function)
        title = (check.__doc__ or function).strip().splitlines()[0].split(":")[0].rstrip(".")
        try:
            sections.append(check(context))
        except FinetuneError as exc:
            needed = context.hub_needed()
            if needed:  # offline: say what needs the Hub rather than report the loader's failure as the recipe's
                why = f"needs the Hugging Face Hub: {needed}, and HF_HUB_OFFLINE is set"
                sections.append(Section(title=title, skipped=why, findings=[Finding("warning", f"{title}: not checked, {why}.")]))
            else:
                sections.append(Section(title=title, findings=[Finding("error", str(exc))]))
    return CheckReport(recipe_name or recipe.name, sections)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# -- the Hub -----------------------------------------------------------------------------------------
def hub_check(context: CheckContext) -> Section:
    """Hub push: the token and write access."""
    from finetune.hub import token_access

    hub = context.recipe.hub
    section = Section("Hub push", columns=["repo", "account", "token", "can write"])
    if not hub.push:
        section.skipped = "hub.push is off"
        return section
    access = token_access(hub.repo_id)
    section.facts = asdict(access)
    section.rows.append([hub.repo_id, access.user or "-", access.role or "-", "yes" if access.can_write else "no"])
    if access.problem:
        section.findings.append(Finding(access.level, access.problem, key="hub.repo_id"))
    return section
