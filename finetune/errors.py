"""Errors a user can act on. The CLI prints them as one paragraph, never a traceback."""

from __future__ import annotations


class FinetuneError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


class RecipeError(FinetuneError):
    """One or more problems in a recipe, each naming its key path (and line where known)."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"{count}{where}:\n" + "\n".join(f"  - {p}" for p in problems))


class DataError(FinetuneError):
    """The data does not fit the recipe: missing file or column, unusable labels."""


class PluginError(FinetuneError):
    """A plugin is unknown, fails to import, or does not meet the plugin contract."""


class TrainingDiverged(FinetuneError):
    """The loss or the gradient norm stopped being finite: the run stops before the update lands."""
