"""Names of modules and parameters inside a model: which lie within which.

Tasks name modules (`TaskModel.head`, `TaskModel.frozen`) by their qualified names; methods and the
core match parameters and submodules against them with this one rule.
"""

from __future__ import annotations


def is_within(name: str, modules: list[str]) -> bool:
    """Whether the parameter or module `name` is one of `modules` or lies inside one of them."""
    return any(name == m or name.startswith(m + ".") for m in modules)
