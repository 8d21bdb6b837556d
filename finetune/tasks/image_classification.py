"""Image classification with any timm model: CNNs (ResNet, ConvNeXt, EfficientNet ...) and ViTs.

Columns (rename yours with `data.columns`): `image` (an Image feature) and `label`. A local
folder with one sub-folder per class (`data.path: my_images`) is read by `datasets`' imagefolder.
Preprocessing follows the model's own timm data config (input size, mean/std, interpolation,
crop); training augmentation is timm's, configurable, and never applied to evaluation.
The saved model is timm's Hub format (config.json with the label names and data config, plus
model.safetensors), so `timm.create_model("local-dir:RUN/model", pretrained=True)` loads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from finetune.api import Artifact, BasePredictor, BaseTask, CardInfo, ExportInputs, PredictOptions, RunRecord, TaskModel
from finetune.columns import require_columns
from finetune.errors import FinetuneError
from finetune.images import ImageOptions, check_images, open_image, skipped_images_note
from finetune.labels import encode_labels, label_facts, label_id, ranked_predictions
from finetune.modules import is_within
from finetune.reports import classification_limitations, classification_sections, label_table

if TYPE_CHECKING:
    from datasets import DatasetDict

_TIMM_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


class Augmentation(BaseModel):
    """timm's training transform (`timm.data.create_transform(is_training=True)`)."""

    model_config = ConfigDict(extra="forbid")
    scale: tuple[float, float] = Field((0.08, 1.0), description="Random-resized-crop area, as a share of the image.")
    ratio: tuple[float, float] = Field((0.75, 1.3333), description="Random-resized-crop aspect ratio range.")
    hflip: float = Field(0.5, ge=0, le=1, description="Probability of a horizontal flip.")
    vflip: float = Field(0.0, ge=0, le=1, description="Probability of a vertical flip.")
    color_jitter: float = Field(
        0.4, ge=0, description="Strength of brightness/contrast/saturation jitter; 0 turns it off. timm skips it when auto_augment is set."
    )
    auto_augment: str | None = Field(None, description="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1, trivialaugment.")
    re_prob: float = Field(0.0, ge=0, le=1, description="Probability of random erasing.")


class ImageClassificationOptions(ImageOptions):
    augmentation: Augmentation | None = Field(
        default_factory=Augmentation,
        description="Training augmentation; null trains on the evaluation transform (resize, center crop, normalise).",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the training loss.")
    drop_path_rate: float | None = Field(None, ge=0, lt=1, description="Stochastic depth for models that support it (ViT, ConvNeXt).")


class ImageClassification(BaseTask):
    Options = ImageClassificationOptions
    methods = None  # every method applies
    default_metrics = ["accuracy", "top5_accuracy", "macro_f1"]
    stratify_column = "label"

    def __init__(self, options: ImageClassificationOptions):
        self.options = options
        self.labels: list[str] = []
        self.facts: dict = {}

    # -- data -----------------------------------------------------------------------------
    def prepare_data(self, splits: DatasetDict) -> DatasetDict:
        # "label" is checked after "image", so a missing label in an image folder means too few class folders.
        require_columns(splits, ("image", "label"), hints={"label": (
            "An image folder gets its labels from the names of its sub-folders, one per class; with "
            "a single class sub-folder (or none) there are no labels, and a classifier needs at least two.")})
        splits, self.labels, unlabelled = encode_labels(splits, "label")
        splits, skipped = check_images(splits, "image", skip=self.options.skip_unreadable_images)
        self.facts = {
            key: value
            for key, value in (("unlabelled_rows_dropped", unlabelled), ("unreadable_images_skipped", skipped))
            if value
        }
        return splits

    def data_facts(self) -> dict:
        return self.facts

    def audit_input(self, row: dict):
        return open_image(row["image"])

    def audit_label(self, row: dict) -> int:
        return row["label"]

    def metric_options(self) -> dict:
        return {"labels": list(range(len(self.labels)))}  # every class counts at every evaluation

    # -- model ----------------------------------------------------------------------------
    def build_model(self, source: str, revision: str | None, *, dtype=None) -> TaskModel:
        import timm

        name = timm_name(source, revision)
        extra = {"drop_path_rate": self.options.drop_path_rate} if self.options.drop_path_rate is not None else {}
        try:
            model = timm.create_model(name, pretrained=True, num_classes=len(self.labels), **extra)
            self.created = (name, extra)  # to build a whole copy for a save from gathered weights
        except Exception as exc:
            if isinstance(exc, TypeError) and "drop_path_rate" in str(exc):
                raise FinetuneError(
                    f"task.options.drop_path_rate: the model '{name}' has no stochastic depth; remove the option."
                ) from None
            raise FinetuneError(
                f"model.name: timm could not load '{name}': {type(exc).__name__}: {exc}. Name a timm model "
                "(resnet50.a1_in1k), a Hub repo (timm/vit_small_patch16_224.augreg_in21k, hf-hub:...) or a local "
                "folder holding config.json and model.safetensors; without access to the Hub, use a local folder."
            ) from None
        if dtype is not None:
            model.to(dtype)  # timm builds in float32; "auto" keeps that
        model.name_or_path = name  # peft records it as the adapter's base_model_name_or_path
        head = _head_modules(model)
        return TaskModel(model=model, head=head, adapter_targets=_adapter_targets(model, head),
                         hub_id=model.pretrained_cfg.get("hf_hub_id"))

    def build_skeleton(self, source: str, revision: str | None) -> TaskModel:
        """timm's architecture (`pretrained=False`: a local folder's config.json, or the registry's name) on the
        meta device, fed images at its data config's input size."""
        import timm
        import torch
        from timm.data import resolve_model_data_config

        name = timm_name(source, revision)
        extra = {"drop_path_rate": self.options.drop_path_rate} if self.options.drop_path_rate is not None else {}
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False, num_classes=len(self.labels) or 2, **extra)
        except Exception as exc:
            raise FinetuneError(f"model.name: timm could not build '{name}' from its config: {type(exc).__name__}: {exc}") from None
        size = tuple(resolve_model_data_config(model)["input_size"])
        head = _head_modules(model)

        def inputs(batch: int) -> dict:
            return {"x": torch.zeros(batch, *size, device="meta")}

        return TaskModel(model=model, head=head, adapter_targets=_adapter_targets(model, head), example_inputs=inputs)

    def preprocess(self, splits: DatasetDict, task_model: TaskModel) -> DatasetDict:
        from datasets import DatasetDict
        from timm.data import create_transform, resolve_model_data_config

        config = resolve_model_data_config(task_model.model)
        evaluation = create_transform(**config, is_training=False)
        training = evaluation
        if self.options.augmentation is not None:
            try:
                training = create_transform(**config, is_training=True, **self.options.augmentation.model_dump())
            except (AssertionError, ValueError, KeyError) as exc:
                raise FinetuneError(
                    f"task.options.augmentation: timm cannot build this augmentation ({type(exc).__name__}: {exc}). "
                    "Check auto_augment (e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, trivialaugment) and the ranges."
                ) from None
        self.facts.update(label_facts(splits, self.labels))  # the final splits: eval may be carved from train
        # Decoded and transformed as batches are drawn: a new random augmentation every epoch.
        return DatasetDict(
            {role: split.with_transform(_Transform(training if role == "train" else evaluation)) for role, split in splits.items()}
        )

    def collate(self, examples: list[dict]) -> dict:
        import torch

        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["labels"] for e in examples]),
        }

    # -- steps ----------------------------------------------------------------------------
    def training_step(self, model, batch: dict) -> dict:
        import torch.nn.functional as F

        logits = model(batch["pixel_values"])
        return {"loss": F.cross_entropy(logits, batch["labels"], label_smoothing=self.options.label_smoothing)}

    def eval_step(self, model, batch: dict) -> dict:
        import torch.nn.functional as F

        logits = model(batch["pixel_values"])
        return {
            "loss": F.cross_entropy(logits.float(), batch["labels"], reduction="none"),
            "predictions": logits.argmax(dim=-1),
            "references": batch["labels"],
            "scores": logits.float(),
        }

    # -- artifacts ------------------------------------------------------------------------
    def save(self, model, directory: Path, *, adapter: bool, state_dict: dict | None = None) -> None:
        import timm
        import torch
        from timm.models import save_for_hf

        if adapter:
            # The LoRA weights and the head, in peft's format; a timm model has no token embeddings to check.
            model.save_pretrained(directory, save_embedding_layers=False, state_dict=state_dict)
            return
        if state_dict is not None:  # gathered from a sharded engine: a whole copy of the model to save it from
            name, extra = self.created
            with torch.device("meta"):  # the architecture only: the gathered weights are assigned in place
                whole = timm.create_model(name, pretrained=False, num_classes=len(self.labels), **extra)
            whole.load_state_dict(state_dict, assign=True)
            whole.pretrained_cfg = model.pretrained_cfg
            model = whole
        save_for_hf(model, directory, model_config={"label_names": self.labels}, safe_serialization=True)

    def load_saved(self, directory: Path, run: RunRecord, source: str, *, adapter: bool, dtype=None):
        import timm

        self.labels = run.task_facts["labels"]
        if not adapter:
            model = timm.create_model(f"local-dir:{directory}", pretrained=True)
            return model.to(dtype) if dtype is not None else model
        from peft import PeftModel

        base = self.build_model(source, run.recipe.model.revision, dtype=dtype).model  # as the run built it
        return PeftModel.from_pretrained(base, directory)

    def export_inputs(self, model) -> ExportInputs:
        import torch
        from timm.data import resolve_model_data_config

        size = resolve_model_data_config(model)["input_size"]  # what the eval transform makes
        pixels = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
        return ExportInputs({"x": pixels}, {"x": {0: "batch"}})  # timm's forward(x)

    def card(self, run: RunRecord, artifact: Artifact) -> CardInfo:
        labels = run.task_facts["labels"]
        return CardInfo(
            pipeline_tag="image-classification",
            library_name="timm",
            usage=_usage(artifact, labels),
            description=f"classifies images into {len(labels)} classes: {', '.join(labels)}",
            tags=["image-classification", "timm", *(["peft"] if artifact.adapter else [])],  # the method's name is a tag too
            sections=classification_sections(run),
            data_sections=label_table(run),
            limitations=[*classification_limitations(run), *skipped_images_note(run)],
        )

    def predictor(self, run: RunRecord, artifact: Artifact, options: PredictOptions) -> ImagePredictor:
        return ImagePredictor(run.task_facts["labels"], artifact, options)


class ImagePredictor(BasePredictor):
    """Image files (or the run's image column) → a class, through the model's own timm evaluation transform,
    loaded as the card's snippet loads it."""

    column = "image"

    def __init__(self, labels: list[str], artifact: Artifact, options: PredictOptions):
        import timm
        from timm.data import create_transform, resolve_model_data_config

        self.labels, self.options = labels, options
        folder = Path(artifact.location) / (artifact.subfolder or "")
        try:
            if artifact.adapter:
                from peft import PeftConfig, PeftModel

                base = timm.create_model(PeftConfig.from_pretrained(str(folder)).base_model_name_or_path,
                                         pretrained=True, num_classes=len(labels))
                configured, self.model = base, PeftModel.from_pretrained(base, str(folder))
            else:
                configured = self.model = timm.create_model(f"local-dir:{folder}", pretrained=True)
        except Exception as exc:
            raise FinetuneError(f"could not load the model in {folder} as its card does ({type(exc).__name__}: {exc}); "
                                "check that the folder is complete.") from None
        self.model.to(options.device).eval()
        self.transform = create_transform(**resolve_model_data_config(configured), is_training=False)

    def read(self, row: dict):
        value = row.get("image")
        if isinstance(value, str):
            value = {"path": value}
        try:
            return self.transform(open_image(value))
        except Exception as exc:
            raise ValueError(f"the image cannot be read ({type(exc).__name__}: {exc})") from None

    def predict(self, inputs: list) -> list[dict]:
        import torch

        with torch.no_grad():
            logits = self.model(torch.stack(inputs).to(self.options.device))
        return ranked_predictions(logits, self.labels, top_k=self.options.top_k, scores=self.options.scores)

    def reference(self, row: dict) -> int:
        return label_id(row.get("label"), self.labels)

    def metric_options(self) -> dict:
        return {"labels": list(range(len(self.labels)))}


def timm_name(source: str, revision: str | None = None) -> str:
    """What `timm.create_model` needs: `local-dir:` for a folder, `hf-hub:` for a Hub repo id,
    a registry name (resnet50.a1_in1k) as it is."""
    if Path(source).is_dir():
        name = f"local-dir:{source}"
    elif source.startswith(_TIMM_PREFIXES) or "/" not in source:
        name = source
    else:
        name = f"hf-hub:{source}"
    if revision:
        if not name.startswith(("hf-hub:", "hf_hub:")):
            raise FinetuneError(
                f"model.revision: '{revision}' applies to Hub repos (timm/resnet50.a1_in1k, hf-hub:...), "
                f"not to '{source}'. Name the repo, or remove model.revision."
            )
        name = f"{name}@{revision}"
    return name


class _Transform:
    """Decode a batch of images and apply a timm transform. A class, not a closure, so that
    DataLoader workers started by spawning (macOS, Windows) can receive it."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, batch: dict) -> dict:
        return {"pixel_values": [self.transform(open_image(v)) for v in batch["image"]], "labels": batch["label"]}


def _head_modules(model) -> list[str]:
    """The classifier as timm's pretrained config names it (a tuple for distilled models), else the
    module(s) `get_classifier()` returns."""
    names = model.pretrained_cfg.get("classifier") or []
    names = [names] if isinstance(names, str) else list(names)
    modules = dict(model.named_modules())
    head = [n for n in names if n in modules]
    if not head:
        classifiers = model.get_classifier()
        classifiers = classifiers if isinstance(classifiers, tuple) else (classifiers,)
        head = [n for n, m in modules.items() if n and any(m is c for c in classifiers)]
    if not head:
        raise FinetuneError(
            f"model.name: cannot find the classifier of {type(model).__name__} (timm's config names "
            f"{names or 'none'}); a head is needed to train and save. Use a timm classification model."
        )
    return head


def _adapter_targets(model, head: list[str]) -> list[str]:
    """For a transformer (linear attention projections: ViT, Swin, MaxViT ...) every linear layer of
    its blocks (attention and MLP); for a CNN, every convolution that is not depthwise (peft's LoRA
    needs groups=1) and every linear layer. Many CNNs have an `attn` slot holding a convolutional
    block or nn.Identity: only linear layers inside it make a transformer."""
    import torch

    modules = [(n, m) for n, m in model.named_modules() if n and not is_within(n, head)]
    transformer = any(isinstance(m, torch.nn.Linear) and ".attn" in f".{n}" for n, m in modules)
    kinds = (torch.nn.Linear,) if transformer else (torch.nn.Linear, torch.nn.Conv2d)
    return [n for n, m in modules if isinstance(m, kinds) and getattr(m, "groups", 1) == 1]


def _usage(artifact: Artifact, labels: list[str]) -> str:
    local = Path(artifact.location).is_dir()
    timm_location = json.dumps(("local-dir:" if local else "hf-hub:") + artifact.location)
    if not artifact.adapter:
        return f"""\
import timm
import torch
from PIL import Image, ImageOps
from timm.data import create_transform, resolve_model_data_config

model = timm.create_model({timm_location}, pretrained=True).eval()
labels = model.pretrained_cfg["label_names"]
{_predict("model")}"""
    where = artifact.loader_arguments()
    return f"""\
import timm
import torch
from peft import PeftConfig, PeftModel
from PIL import Image, ImageOps
from timm.data import create_transform, resolve_model_data_config

labels = {json.dumps(labels)}
base = timm.create_model(PeftConfig.from_pretrained({where}).base_model_name_or_path, pretrained=True, num_classes=len(labels))
model = PeftModel.from_pretrained(base, {where}).eval()
{_predict("base")}"""


def _predict(configured: str) -> str:
    """The snippet's last lines: preprocess as the model `configured` says, print the top class."""
    return f"""\
transform = create_transform(**resolve_model_data_config({configured}), is_training=False)
image = ImageOps.exif_transpose(Image.open("image.jpg")).convert("RGB")
with torch.no_grad():
    probabilities = model(transform(image).unsqueeze(0)).softmax(-1)[0]
print(labels[probabilities.argmax()], f"{{probabilities.max():.3f}}")
"""
