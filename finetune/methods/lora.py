"""LoRA through peft: low-rank adapters on the backbone, the task head trained in full.

The head is always in `modules_to_save`: without it a freshly initialised head would stay
frozen and would not be saved, and the reloaded model would predict something else. For the
same reason the backbone's batch-norm layers are held in eval mode (`frozen_modules`): their
running statistics are not part of the adapter, so letting them move would make the reloaded
adapter predict differently from the trained one. Modules the task marks frozen (a diffusion
pipeline's VAE) get no adapter even when a target name matches inside them.

The LoRA family's options (DoRA, rsLoRA, the initialisation, `layers_to_transform`) go to peft's
`LoraConfig` as they are; `adapter_config` builds that config once, for `prepare` and for the checks
(`finetune check`, `finetune validate`), so both agree with what peft will adapt.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from finetune.api import BaseMethod, TaskModel
from finetune.errors import FinetuneError
from finetune.modules import is_within

# peft's task types by the transformers head class a model's name ends with: peft then wraps the model
# in its matching PeftModel subclass and records the type, so that its Auto classes reload the adapter.
_PEFT_TASK_TYPES = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
                    "ForQuestionAnswering": "QUESTION_ANS", "ForCausalLM": "CAUSAL_LM", "ForSeq2SeqLM": "SEQ_2_SEQ_LM"}

INITIALISATIONS = (True, False, "gaussian", "orthogonal")
"""peft's `init_lora_weights` values finetune runs (tests/test_lora_options.py checks each is one of peft's)."""
_REFUSED_INITIALISATIONS = {
    "pissa": "rewrites the base weights (W - BA), so the saved adapter would not load onto the original base",
    "olora": "rewrites the base weights (W - BA), so the saved adapter would not load onto the original base",
    "corda": "rewrites the base weights and needs a data pass before training",
    "eva": "needs a data pass over the train split before training (peft's initialize_lora_eva_weights)",
    "loftq": "needs a LoftQ quantization config",
    "mica": "freezes lora_B, a variant finetune does not save and reload yet",
}
QUANTIZE_REQUIREMENT = "method.options.quantize needs a CUDA GPU and pip install bitsandbytes"


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1, description="Rank of the update matrices.")
    alpha: float = Field(16, gt=0, description="Scaling: the update is multiplied by alpha / r (alpha / sqrt(r) with use_rslora).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; default: the task's choice for the architecture (attention projections)."
    )
    layers_to_transform: list[int] | None = Field(
        None, description="Adapt only the targets inside these layer indexes (the first number in a module's name, "
        "layer.3.attention.q_lin → 3); default: every layer."
    )
    use_dora: bool = Field(False, description="DoRA: a trained magnitude per output feature on top of the low-rank direction.")
    use_rslora: bool = Field(False, description="rsLoRA: scale the update by alpha / sqrt(r), stable at large ranks.")
    init_lora_weights: bool | str = Field(
        True, description="peft's initialisation: true (B = 0, the adapter starts as a no-op), false (random, for "
        "debugging), gaussian, orthogonal."
    )
    quantize: Literal["4bit", "8bit"] | None = Field(
        None, description="QLoRA: hold the frozen base's linear layers in 4 or 8 bits (bitsandbytes, CUDA only)."
    )

    @field_validator("init_lora_weights")
    @classmethod
    def _known_initialisation(cls, value):
        if value in INITIALISATIONS:
            return value
        name = value.split("_niter_")[0] if isinstance(value, str) else value
        if name in _REFUSED_INITIALISATIONS:
            raise ValueError(f"'{value}' {_REFUSED_INITIALISATIONS[name]}; use one of {list(INITIALISATIONS)}")
        raise ValueError(f"'{value}' is not one of peft's initialisations finetune runs: {list(INITIALISATIONS)}")



class Lora(BaseMethod):
    Options = LoraOptions
    produces_adapter = True
    title = "a LoRA adapter"
    validated_keys = ("target_modules", "layers_to_transform")

    def missing_requirements(self) -> list[str]:
        if self.options.quantize and importlib.util.find_spec("bitsandbytes") is None:
            return [f"{QUANTIZE_REQUIREMENT}: bitsandbytes is not installed. Install it on a machine with a CUDA GPU, "
                    "or remove method.options.quantize to train LoRA on the full-precision base."]
        return []

    def __init__(self, options: LoraOptions):
        self.options = options
        self.statistics: list = []  # the backbone's batch-norm layers

    def adapter_config(self, task_model: TaskModel):
        """The peft LoraConfig `prepare` applies to `task_model`."""
        from peft import LoraConfig

        targets = self.options.target_modules or task_model.adapter_targets
        if not targets:
            raise FinetuneError(
                f"method.options.target_modules: there is no default LoRA target for "
                f"{type(task_model.model).__name__}; name the modules to adapt, e.g. [query, value]."
            )
        try:
            return LoraConfig(
                r=self.options.r,
                lora_alpha=self.options.alpha,
                lora_dropout=self.options.dropout,
                target_modules=list(targets),
                layers_to_transform=self.options.layers_to_transform,
                use_dora=self.options.use_dora,
                use_rslora=self.options.use_rslora,
                init_lora_weights=self.options.init_lora_weights,
                modules_to_save=list(task_model.head) or None,  # peft mutates this list: give it a copy
                exclude_modules=_frozen_pattern(task_model.frozen),
                task_type=_peft_task_type(task_model.model),
            )
        except ValueError as exc:
            raise FinetuneError(f"method.options: peft refuses this LoRA configuration: {exc}") from None

    def prepare(self, task_model: TaskModel):
        from peft import get_peft_model

        config = self.adapter_config(task_model)
        if _on_meta(task_model.model):
            config.init_lora_weights = True  # a skeleton (finetune check) has no values to initialise from; same shapes
        elif self.options.quantize:
            _quantize(task_model, self.options.quantize)
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


def _on_meta(model) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def _quantize(task_model: TaskModel, bits: str) -> None:
    """QLoRA: every linear layer outside the head and the trained-in-full modules becomes a bitsandbytes layer
    (quantized as it moves to the GPU), then peft's k-bit preparation. Needs CUDA and bitsandbytes."""
    import torch

    if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
        raise FinetuneError(f"{QUANTIZE_REQUIREMENT}: this machine has "
                            f"{'no CUDA GPU' if not torch.cuda.is_available() else 'no bitsandbytes'}. Remove "
                            "method.options.quantize to train LoRA on the full-precision base here.")
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    model = task_model.model
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or is_within(name, task_model.head):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if bits == "4bit":
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                        has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(module.weight.data, requires_grad=False, has_fp16_weights=False)
        if module.bias is not None:
            layer.bias = module.bias
        setattr(parent, child, layer.cuda())  # bitsandbytes quantizes on the move to the GPU
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _peft_task_type(model) -> str | None:
    name = type(model).__name__
    return next((kind for suffix, kind in _PEFT_TASK_TYPES.items() if name.endswith(suffix)), None)


def _frozen_pattern(frozen: list[str]) -> str | None:
    """A regex matching every module inside the frozen ones, for peft's `exclude_modules`."""
    if not frozen:
        return None
    return rf"({'|'.join(map(re.escape, frozen))})(\..*)?"
