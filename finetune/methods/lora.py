"""LoRA through peft: low-rank adapters on the backbone, the task head trained in full.

The head is always in `modules_to_save`: without it a freshly initialised head would stay
frozen and would not be saved, and the reloaded model would predict something else. For the
same reason the backbone's batch-norm layers are held in eval mode: their running statistics
are not part of the adapter, so letting them move would make the reloaded adapter predict
differently from the trained one. Modules the task marks frozen (a diffusion pipeline's VAE)
get no adapter even when a target name matches inside them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from finetune.api import TaskModel
from finetune.errors import FinetuneError
from finetune.methods.common import frozen_pattern, is_head, keep_in_eval


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1, description="Rank of the update matrices.")
    alpha: float = Field(16, gt=0, description="Scaling: the update is multiplied by alpha / r.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; default: the task's choice for the architecture (attention projections)."
    )


class Lora:
    Options = LoraOptions
    produces_adapter = True

    def __init__(self, options: LoraOptions):
        self.options = options

    def prepare(self, task_model: TaskModel):
        from peft import LoraConfig, get_peft_model

        targets = self.options.target_modules or task_model.lora_targets
        if not targets:
            raise FinetuneError(
                f"method.options.target_modules: there is no default LoRA target for "
                f"{type(task_model.model).__name__}; name the modules to adapt, e.g. [query, value]."
            )
        config = LoraConfig(
            r=self.options.r,
            lora_alpha=self.options.alpha,
            lora_dropout=self.options.dropout,
            target_modules=list(targets),
            modules_to_save=list(task_model.head) or None,  # peft mutates this list: give it a copy
            exclude_modules=frozen_pattern(task_model.frozen),
            task_type=task_model.peft_task_type,
        )
        for name, module in task_model.model.named_modules():
            if getattr(module, "track_running_stats", False) and not is_head(name, task_model.head):
                keep_in_eval(module)
        try:
            return get_peft_model(task_model.model, config)
        except ValueError as exc:
            raise FinetuneError(f"method.options.target_modules: {exc}") from None

    def merge(self, model):
        return model.merge_and_unload()
