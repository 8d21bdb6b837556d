"""Full fine-tuning: every weight of the backbone and head is trained."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from finetune.api import TaskModel


class FullOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Full:
    Options = FullOptions
    produces_adapter = False

    def __init__(self, options: FullOptions):
        self.options = options

    def prepare(self, task_model: TaskModel):
        task_model.model.requires_grad_(True)
        return task_model.model

    def merge(self, model):
        return model
