"""Full fine-tuning: every weight of the backbone and head is trained (except the modules the
task marks frozen, which the core keeps frozen), the backbone optionally with a smaller learning rate (pretrained weights need
smaller steps than a new head)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from finetune.api import BaseMethod, TaskModel
from finetune.modules import is_within


class FullOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backbone_lr: float | None = Field(
        None, gt=0, description="Learning rate of the pretrained backbone; default train.lr. The head always uses train.lr."
    )


class Full(BaseMethod):
    Options = FullOptions
    produces_adapter = False
    title = "a full fine-tune"

    def __init__(self, options: FullOptions):
        self.options = options
        self.head: list[str] = []

    def prepare(self, task_model: TaskModel):
        self.head = list(task_model.head)
        task_model.model.requires_grad_(True)  # the core then freezes TaskModel.frozen again
        return task_model.model

    def parameter_groups(self, model):
        trained = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
        if self.options.backbone_lr is None:
            return [{"params": [param for _, param in trained]}]
        head, backbone = [], []
        for name, param in trained:
            (head if is_within(name, self.head) else backbone).append(param)
        return [{"params": head}, {"params": backbone, "lr": self.options.backbone_lr}]

    def merge(self, model):
        return model
