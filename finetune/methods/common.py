"""Small helpers the built-in methods share."""

from __future__ import annotations

import re
import types


def is_head(name: str, head: list[str]) -> bool:
    """Whether the parameter or module `name` lies inside one of the head modules."""
    return any(name == h or name.startswith(h + ".") for h in head)


def keep_in_eval(module) -> None:
    """Make `module.train()` a no-op that keeps eval mode (the state dict is untouched):
    dropout stays off and batch-norm running statistics stop moving."""

    def train(self, mode: bool = True):
        return type(self).train(self, False)

    module.train = types.MethodType(train, module)
    module.eval()


def frozen_pattern(frozen: list[str]) -> str | None:
    """A regex matching every module inside the frozen ones, for peft's `exclude_modules`."""
    if not frozen:
        return None
    return rf"({'|'.join(map(re.escape, frozen))})(\..*)?"
