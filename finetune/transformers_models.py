"""What tasks on transformers models share: loading a pretrained backbone with a new
classification head (per text, per token ...) and telling methods which modules are new.

Public: the text-classification task and third-party plugins (token classification) use it.
"""

from __future__ import annotations

import json

from finetune.api import Artifact, TaskModel
from finetune.errors import FinetuneError
from finetune.methods.common import is_head

# peft knows the attention projections of most encoders; these are the ones it lacks.
_EXTRA_LORA_TARGETS = {"distilbert": ["q_lin", "v_lin"]}


def classifier_task_model(auto_class, source: str, revision: str | None, labels: list[str], peft_task_type: str) -> TaskModel:
    """`auto_class.from_pretrained(source)` with a head for `labels` (their names in the config's
    `id2label`), its head modules found, and peft's default LoRA targets for the architecture.

    `auto_class` is a transformers Auto class such as AutoModelForTokenClassification; a load
    failure becomes a FinetuneError naming `model.name`."""
    try:
        model, info = auto_class.from_pretrained(
            source,
            revision=revision,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            ignore_mismatched_sizes=True,  # a checkpoint that already has a head of another size
            output_loading_info=True,
        )
    except Exception as exc:
        raise FinetuneError(
            f"model.name: could not load '{source}' with {auto_class.__name__}: {type(exc).__name__}: {exc}"
        ) from None
    return TaskModel(model=model, head=head_modules(model, info), lora_targets=lora_targets(model), peft_task_type=peft_task_type)


def lora_targets(model) -> list[str]:
    """peft's default LoRA target modules for the model's architecture (empty when peft has none)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    model_type = model.config.model_type
    return list(_EXTRA_LORA_TARGETS.get(model_type) or PEFT_TARGETS.get(model_type) or [])


def head_modules(model, loading_info: dict) -> list[str]:
    """The task head: every top-level module outside the pretrained backbone, plus any module
    whose weights were newly initialised (a frozen random layer would silently hurt)."""
    backbone = getattr(model, model.base_model_prefix, None)
    head = [
        name
        for name, child in model.named_children()
        if child is not backbone and any(True for _ in child.parameters())
    ]
    mismatched = [k[0] if isinstance(k, tuple) else k for k in loading_info.get("mismatched_keys", [])]
    for key in [*loading_info.get("missing_keys", []), *mismatched]:
        module = key.rsplit(".", 1)[0]
        if not is_head(module, head):
            head.append(module)
    return head


def adapter_snippet(artifact: Artifact, auto_class: str, labels: list[str]) -> str:
    """Card code that loads a LoRA adapter `artifact` as `model` (a PeftModel) with its `tokenizer`;
    the task appends the lines that use them. The base model is built with the run's labels,
    which its own config does not have."""
    where = json.dumps(artifact.location) + (f', subfolder="{artifact.subfolder}"' if artifact.subfolder else "")
    id2label = json.dumps(dict(enumerate(labels)))
    return f"""\
from peft import PeftConfig, PeftModel
from transformers import {auto_class}, AutoTokenizer

id2label = {{int(k): v for k, v in {id2label}.items()}}
config = PeftConfig.from_pretrained({where})
base = {auto_class}.from_pretrained(
    config.base_model_name_or_path, num_labels={len(labels)}, id2label=id2label, label2id={{v: k for k, v in id2label.items()}}
)
model = PeftModel.from_pretrained(base, {where})
tokenizer = AutoTokenizer.from_pretrained({where})
"""
