"""LoRA through peft: low-rank adapters on the backbone, the task head trained in full.

The head is always in `modules_to_save`: without it a freshly initialised head would stay
frozen and would not be saved, and the reloaded model would predict something else. For the
same reason the backbone's batch-norm layers are held in eval mode (`frozen_modules`): their
running statistics are not part of the adapter, so letting them move would make the reloaded
adapter predict differently from the trained one. Modules the task marks frozen (a diffusion
pipeline's VAE) get no adapter even when a target name matches inside them.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

from finetune.api import BaseMethod, TaskModel
from finetune.errors import FinetuneError
from finetune.modules import is_within

# peft's task types by the transformers head class a model's name ends with: peft then wraps the model
# in its matching PeftModel subclass and records the type, so that its Auto classes reload the adapter.
_PEFT_TASK_TYPES = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
                    "ForQuestionAnswering": "QUESTION_ANS", "ForCausalLM": "CAUSAL_LM", "ForSeq2SeqLM": "SEQ_2_SEQ_LM"}


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1, description="Rank of the update matrices.")
    alpha: float = Field(16, gt=0, description="Scaling: the update is multiplied by alpha / r.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; default: the task's choice for the architecture (attention projections)."
    )


class Lora(BaseMethod):
    Options = LoraOptions
    produces_adapter = True
    title = "a LoRA adapter"

    def __init__(self, options: LoraOptions):
        self.options = options
        self.statistics: list = []  # the backbone's batch-norm layers

    def prepare(self, task_model: TaskModel):
        from peft import LoraConfig, get_peft_model

        targets = self.options.target_modules or task_model.adapter_targets
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
            exclude_modules=_frozen_pattern(task_model.frozen),
            task_type=_peft_task_type(task_model.model),
        )
        self.statistics = [module for name, module in task_model.model.named_modules()
                           if getattr(module, "track_running_stats", False) and not is_within(name, task_model.head)]
        try:
            return get_peft_model(task_model.model, config)
        except ValueError as exc:
            raise FinetuneError(f"method.options.target_modules: {exc}") from None

    def frozen_modules(self, model):
        return self.statistics

    def merge(self, model):
        return model.merge_and_unload()


def _peft_task_type(model) -> str | None:
    name = type(model).__name__
    return next((kind for suffix, kind in _PEFT_TASK_TYPES.items() if name.endswith(suffix)), None)


def _frozen_pattern(frozen: list[str]) -> str | None:
    """A regex matching every module inside the frozen ones, for peft's `exclude_modules`."""
    if not frozen:
        return None
    return rf"({'|'.join(map(re.escape, frozen))})(\..*)?"
