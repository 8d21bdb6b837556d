"""Small helpers the built-in methods share."""

from __future__ import annotations


def is_head(name: str, head: list[str]) -> bool:
    """Whether the parameter or module `name` lies inside one of the head modules."""
    return any(name == h or name.startswith(h + ".") for h in head)
