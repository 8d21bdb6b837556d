"""Small helpers the built-in methods share."""

from __future__ import annotations

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
