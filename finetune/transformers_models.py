"""What tasks on transformers models share: `TransformersClassifier`, the base of every task that
puts a new classification head (per text, per token ...) on a pretrained transformers encoder.

Public: the text-classification task and third-party plugins (token classification) inherit it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, ClassVar

from finetune.api import Artifact, BaseTask, ExportInputs, RunRecord, TaskModel
from finetune.errors import FinetuneError
from finetune.modules import is_within

if TYPE_CHECKING:
    from pathlib import Path

# peft knows the attention projections of most encoders; these are the ones it lacks.
_EXTRA_ADAPTER_TARGETS = {"distilbert": ["q_lin", "v_lin"]}


class TransformersClassifier(BaseTask):
    """A transformers encoder with a new head for `class_names()`, loaded by `auto_class`, with its tokenizer.

    A subclass gives `auto_class` and `class_names`, and its own data (`prepare_data`, `preprocess`,
    which sets `self.collator`), `eval_step` and `card`; loading, batching, the training step and
    saving are shared. Override `load_tokenizer` for tokenizer options or checks."""

    auto_class: ClassVar[str]
    """The transformers Auto class of the model with its head, e.g. "AutoModelForSequenceClassification"."""

    def __init__(self, options):
        self.options = options
        self.tokenizer = None
        self.collator = None  # set by preprocess: pads a batch of tokenised examples

    def class_names(self) -> list[str]:
        """The head's classes, in id order (known after prepare_data)."""
        raise NotImplementedError

    def load_tokenizer(self, source: str, revision: str | None, **options):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(source, revision=revision, **options)
        except Exception as exc:
            raise FinetuneError(f"model.name: could not load a tokenizer from '{source}': {type(exc).__name__}: {exc}") from None

    def build_model(self, source: str, revision: str | None, *, dtype=None) -> TaskModel:
        import transformers

        self.tokenizer = self.load_tokenizer(source, revision)
        return classifier_task_model(getattr(transformers, self.auto_class), source, revision, self.class_names(), dtype=dtype)

    def build_skeleton(self, source: str, revision: str | None) -> TaskModel:
        """The model from its config.json on the meta device, with a head for `class_names()` (two placeholder
        classes before prepare_data), fed token ids of `options.max_length` (or the model's longest)."""
        import torch
        import transformers
        from transformers import AutoConfig

        labels = self.class_names() or ["0", "1"]
        try:
            config = AutoConfig.from_pretrained(source, revision=revision, num_labels=len(labels),
                                                id2label=dict(enumerate(labels)),
                                                label2id={name: i for i, name in enumerate(labels)})
        except Exception as exc:
            raise FinetuneError(f"model.name: could not read the config of '{source}': {type(exc).__name__}: {exc}") from None
        with torch.device("meta"):
            model = getattr(transformers, self.auto_class).from_config(config, dtype=torch.float32)
        length = min(getattr(self.options, "max_length", 512), getattr(config, "max_position_embeddings", 512) or 512)

        def inputs(batch: int) -> dict:
            # no attention mask: every token counts (the longest batch), and no mask check that reads values
            return {"input_ids": torch.zeros(batch, length, dtype=torch.long, device="meta"),
                    "labels": torch.zeros(batch, *self.skeleton_label_shape(length), dtype=torch.long, device="meta")}

        return TaskModel(model=model, head=head_modules(model, {}), adapter_targets=adapter_targets(model),
                         example_inputs=inputs)

    def skeleton_label_shape(self, length: int) -> tuple:
        """The shape of one example's labels after its batch dimension: () per text, (length,) per token."""
        return (length,) if self.auto_class == "AutoModelForTokenClassification" else ()

    def collate(self, examples: list[dict]) -> dict:
        return self.collator(examples)

    def training_step(self, model, batch: dict) -> dict:
        return {"loss": model(**batch).loss}  # the model's own loss: the mean over the batch's labelled items

    def save(self, model, directory: Path, *, adapter: bool, state_dict: dict | None = None) -> None:
        model.save_pretrained(directory, state_dict=state_dict)  # a PEFT adapter (with the head) or a full model
        self.tokenizer.save_pretrained(directory)

    def load_saved(self, directory: Path, run: RunRecord, source: str, *, adapter: bool, dtype=None):
        import transformers

        auto_class = getattr(transformers, self.auto_class)
        self.tokenizer = self.load_tokenizer(str(directory), None)  # save wrote it beside the model
        if not adapter:
            return auto_class.from_pretrained(directory, dtype=dtype or "auto")
        from peft import PeftModel

        # The base as the run built it: its head for the run's labels, replaced by the adapter's trained copy.
        base = classifier_task_model(auto_class, source, run.recipe.model.revision, run.task_facts["labels"], dtype=dtype)
        return PeftModel.from_pretrained(base.model, directory)

    def export_inputs(self, model) -> ExportInputs:
        # Two texts of different lengths, so the export sees padding and an attention mask that masks.
        batch = self.tokenizer(["a short text", "a longer text, padded to the length of the longest in its batch"],
                               padding=True, return_tensors="pt")
        return ExportInputs(dict(batch), {name: {0: "batch", 1: "sequence"} for name in batch})


def classifier_task_model(auto_class, source: str, revision: str | None, labels: list[str], *, dtype=None) -> TaskModel:
    """`auto_class.from_pretrained(source)` in `dtype` (None: the checkpoint's own) with a head for `labels`
    (their names in the config's `id2label`), its head modules found, and the modules an adapter
    targets for the architecture. transformers loads the weights straight into place (no random
    initialisation first, one copy in memory).

    `auto_class` is a transformers Auto class such as AutoModelForTokenClassification; a load
    failure becomes a FinetuneError naming `model.name`."""
    try:
        model, info = auto_class.from_pretrained(
            source,
            revision=revision,
            dtype=dtype or "auto",
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
    return TaskModel(model=model, head=head_modules(model, info), adapter_targets=adapter_targets(model))


def adapter_targets(model) -> list[str]:
    """The attention projections of the model's architecture, as peft's LoRA defaults name them (empty when unknown)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS

    model_type = model.config.model_type
    return list(_EXTRA_ADAPTER_TARGETS.get(model_type) or PEFT_TARGETS.get(model_type) or [])


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
        if not is_within(module, head):
            head.append(module)
    return head


def adapter_snippet(artifact: Artifact, auto_class: str, labels: list[str]) -> str:
    """Card code that loads a LoRA adapter `artifact` as `model` (a PeftModel) with its `tokenizer`;
    the task appends the lines that use them. The base model is built with the run's labels,
    which its own config does not have."""
    where = artifact.loader_arguments()
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


def load_for_prediction(artifact: Artifact, auto_class: str, labels: list[str], device: str):
    """`(model, tokenizer)` loaded as the card's snippet loads `artifact` (adapter_snippet for an adapter:
    the base built with the run's labels, then the adapter, unmerged), in eval mode on `device`."""
    import transformers
    from transformers import AutoTokenizer

    where = {"subfolder": artifact.subfolder} if artifact.subfolder else {}
    model_class = getattr(transformers, auto_class)
    try:
        if artifact.adapter:
            from peft import PeftConfig, PeftModel

            base_name = PeftConfig.from_pretrained(artifact.location, **where).base_model_name_or_path
            id2label = dict(enumerate(labels))
            verbosity = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()  # its report of the new head: the adapter brings the trained one
            try:
                base = model_class.from_pretrained(base_name, num_labels=len(labels), id2label=id2label,
                                                   label2id={v: k for k, v in id2label.items()})
            finally:
                transformers.logging.set_verbosity(verbosity)
            model = PeftModel.from_pretrained(base, artifact.location, **where)
        else:
            model = model_class.from_pretrained(artifact.location, **where)
        tokenizer = AutoTokenizer.from_pretrained(artifact.location, **where)
    except Exception as exc:
        raise FinetuneError(f"could not load the model in {artifact.location} as its card does "
                            f"({type(exc).__name__}: {exc}); check that the folder is complete.") from None
    return model.to(device).eval(), tokenizer
