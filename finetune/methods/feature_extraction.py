"""Feature extraction: the pretrained backbone is frozen, only the new head is trained.

The backbone is also held in eval mode (`frozen_modules`), so dropout is off and batch-norm
statistics do not move: every backbone weight and buffer stays bit-identical.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from finetune.api import BaseMethod, TaskModel
from finetune.modules import is_within


class FeatureExtractionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeatureExtraction(BaseMethod):
    Options = FeatureExtractionOptions
    produces_adapter = False
    title = "a trained head on the frozen features"

    def __init__(self, options: FeatureExtractionOptions):
        self.options = options
        self.head: list[str] = []

    def prepare(self, task_model: TaskModel):
        model, self.head = task_model.model, list(task_model.head)
        for name, param in model.named_parameters():
            param.requires_grad_(is_within(name, self.head))
        return model

    def frozen_modules(self, model):
        return _frozen_roots(model, self.head)

    def merge(self, model):
        return model


def _frozen_roots(model, head: list[str]) -> list:
    """The outermost modules that hold no part of the head."""

    def holds_head(name: str) -> bool:
        return any(h == name or h.startswith(name + ".") for h in head)

    roots = []
    for name, module in model.named_modules():
        if not name or holds_head(name) or is_within(name, head) or not any(True for _ in module.parameters()):
            continue  # parameter-free modules (the head's dropout) keep following model.train()
        parent = name.rpartition(".")[0]
        if not parent or holds_head(parent):
            roots.append(module)
    return roots
