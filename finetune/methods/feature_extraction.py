"""Feature extraction: the pretrained backbone is frozen, only the new head is trained.

The backbone is also held in eval mode, so dropout is off and batch-norm statistics do not
move: every backbone weight and buffer stays bit-identical.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from finetune.api import TaskModel
from finetune.methods.common import is_head, keep_in_eval


class FeatureExtractionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeatureExtraction:
    Options = FeatureExtractionOptions
    produces_adapter = False

    def __init__(self, options: FeatureExtractionOptions):
        self.options = options

    def prepare(self, task_model: TaskModel):
        model, head = task_model.model, task_model.head
        for name, param in model.named_parameters():
            param.requires_grad_(is_head(name, head))
        for module in _frozen_roots(model, head):
            keep_in_eval(module)
        return model

    def merge(self, model):
        return model


def _frozen_roots(model, head: list[str]) -> list:
    """The outermost modules that hold no part of the head."""

    def holds_head(name: str) -> bool:
        return any(h == name or h.startswith(name + ".") for h in head)

    roots = []
    for name, module in model.named_modules():
        if not name or holds_head(name) or is_head(name, head) or not any(True for _ in module.parameters()):
            continue  # parameter-free modules (the head's dropout) keep following model.train()
        parent = name.rpartition(".")[0]
        if not parent or holds_head(parent):
            roots.append(module)
    return roots
