"""The text-to-image task plugin: the contract's members, each handing its work to the module of
its concern (see the package's docstring)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from finetune.api import Artifact, BaseTask, CardInfo, PredictOptions, RunRecord, TaskModel
from finetune.columns import require_columns
from finetune.errors import DataError
from finetune.images import check_images, open_image, skipped_images_note
from finetune.tasks.text_to_image import card
from finetune.tasks.text_to_image.data import is_caption
from finetune.tasks.text_to_image.options import TextToImageOptions

if TYPE_CHECKING:
    from datasets import DatasetDict

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' Attention projections
TEXT_ENCODER_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP's


class TextToImage(BaseTask):
    Options = TextToImageOptions
    methods = ("lora", "full")  # feature extraction would train nothing: a UNet has no head to put on top
    default_metrics: list[str] = []  # the validation loss and the samples say how a generator does
    stratify_column = None

    def __init__(self, options: TextToImageOptions):
        self.options = options
        self.facts: dict = {}
        self.pipeline = None  # the loaded pipeline: its tokenizer and inference scheduler serve samples and saves
        self.source, self.revision = "", None

    # -- data -----------------------------------------------------------------------------
    def prepare_data(self, splits: DatasetDict) -> DatasetDict:
        require_columns(splits, ("image", "text"), hints={"text": (
            "An image folder takes its captions from a metadata.jsonl (or metadata.csv) file beside the images, "
            "with a `file_name` and a `text` field per image.")})
        for role, split in splits.items():
            for row, caption in enumerate(split["text"]):
                if not is_caption(caption):
                    raise DataError(
                        f"The 'text' column of the {role} split holds {caption!r} in row {row}, not a caption: each "
                        "image needs a string (or a list of strings). Fix or remove that row."
                    )
        splits, skipped = check_images(splits, "image", skip=self.options.skip_unreadable_images)
        self.facts = {"unreadable_images_skipped": skipped} if skipped else {}
        return splits

    def data_facts(self) -> dict:
        return self.facts

    def audit_input(self, row: dict):
        """The image, not the caption: the image is what the model learns to make and what the validation loss
        scores, so an image in train and eval leaks whatever its captions say. Captions are no labels either: one
        image with several captions (or one caption for many images) is ordinary data, not a conflict."""
        return open_image(row["image"])

    # -- model ----------------------------------------------------------------------------
    def build_model(self, source: str, revision: str | None, *, dtype=None) -> TaskModel:
        from finetune.tasks.text_to_image.model import DiffusionModel, load_pipeline

        self.pipeline, noise_scheduler = load_pipeline(source, revision, self.options.eval_timesteps, dtype)
        self.source, self.revision = source, revision
        pipeline, train_text = self.pipeline, self.options.train_text_encoder
        model = DiffusionModel(pipeline.unet, pipeline.vae, pipeline.text_encoder, noise_scheduler, self.options.snr_gamma)
        return TaskModel(
            model=model,
            head=[],  # nothing is new: every trained weight is pretrained
            adapter_targets=UNET_ATTENTION + (TEXT_ENCODER_ATTENTION if train_text else []),
            frozen=["vae"] + ([] if train_text else ["text_encoder"]),
            components=["unet", "text_encoder"],
        )

    def build_skeleton(self, source: str, revision: str | None) -> TaskModel:
        """The UNet, VAE and text encoder from their configs on the meta device, fed a batch of images at
        `resolution` and captions of the text encoder's length."""
        import torch

        from finetune.tasks.text_to_image.model import DiffusionModel, skeleton_components

        unet, vae, text_encoder, noise_scheduler = skeleton_components(source, revision)
        train_text = self.options.train_text_encoder
        length, size = text_encoder.config.max_position_embeddings, self.options.resolution

        def inputs(batch: int) -> dict:
            return {"input_ids": torch.zeros(batch, length, dtype=torch.long, device="meta"),
                    "pixel_values": torch.zeros(batch, 3, size, size, device="meta")}

        return TaskModel(
            model=DiffusionModel(unet, vae, text_encoder, noise_scheduler, self.options.snr_gamma),
            head=[],
            adapter_targets=UNET_ATTENTION + (TEXT_ENCODER_ATTENTION if train_text else []),
            frozen=["vae"] + ([] if train_text else ["text_encoder"]),
            components=["unet", "text_encoder"],
            example_inputs=inputs,
        )

    def preprocess(self, splits: DatasetDict, task_model: TaskModel) -> DatasetDict:
        from datasets import DatasetDict

        from finetune.tasks.text_to_image.data import Examples, encode_latents, latents_fingerprint

        prepared = {}
        for role, split in splits.items():
            training = role == "train"
            if not training:  # the fixed noise of the validation loss: one seed per example
                split = split.add_column("noise_seed", list(range(len(split))))
            examples = Examples(self.pipeline.tokenizer, self.options, training=training)
            if self.options.precompute_latents:
                fingerprint = latents_fingerprint(split, self.source, self.revision, self.options, task_model.model.vae.dtype)
                prepared[role] = encode_latents(split, examples, task_model.model.vae, fingerprint)
            else:  # decoded and augmented as batches are drawn: a new crop and flip every epoch
                prepared[role] = split.with_transform(examples)
        return DatasetDict(prepared)

    def collate(self, examples: list[dict]) -> dict:
        import torch

        return {key: torch.stack([torch.as_tensor(e[key]) for e in examples]) for key in examples[0]}

    # -- steps ----------------------------------------------------------------------------
    def training_step(self, model, batch: dict) -> dict:
        return {"loss": model(**batch).mean()}

    def eval_step(self, model, batch: dict) -> dict:
        return {"loss": model(**batch, timesteps=self.options.eval_timesteps)}  # one loss per example

    # -- artifacts ------------------------------------------------------------------------
    def write_samples(self, model, directory: Path) -> None:
        from finetune.tasks.text_to_image.sampling import draw_samples

        draw_samples(self._components(model), self.options, directory)

    def save(self, model, directory: Path, *, adapter: bool) -> None:
        from diffusers import StableDiffusionPipeline

        from finetune.tasks.text_to_image.model import diffusion_model_of, lora_layers

        if adapter:
            layers = lora_layers(model)
            StableDiffusionPipeline.save_lora_weights(
                directory,
                unet_lora_layers=layers.get("unet", (None, None))[0],
                text_encoder_lora_layers=layers.get("text_encoder", (None, None))[0],
                unet_lora_adapter_metadata=layers.get("unet", (None, None))[1],
                text_encoder_lora_adapter_metadata=layers.get("text_encoder", (None, None))[1],
            )
        else:  # the base pipeline with the trained parts; its safety checker, if it has one, is loaded and kept
            # The frozen parts come from the source again, in its precision (training may have held them in bf16).
            trained = diffusion_model_of(model)
            parts = {"unet": trained.unet, **({"text_encoder": trained.text_encoder} if self.options.train_text_encoder else {})}
            pipeline = StableDiffusionPipeline.from_pretrained(self.source, revision=self.revision, **parts)
            pipeline.save_pretrained(directory)

    def load_saved(self, directory: Path, run: RunRecord, source: str, *, adapter: bool, dtype=None):
        from finetune.tasks.text_to_image.model import with_lora

        if not adapter:  # a whole pipeline: it is its own source for the frozen parts a save takes again
            return self.build_model(str(directory), None, dtype=dtype).model
        task_model = self.build_model(source, run.recipe.model.revision, dtype=dtype)
        return with_lora(task_model.model, directory, task_model.frozen)

    def _components(self, model) -> dict:
        """The pipeline's components, with the trained UNet and text encoder of `model` in place."""
        from finetune.tasks.text_to_image.model import diffusion_model_of

        trained = diffusion_model_of(model).eval()
        # Outside autocast every component must share one precision: the frozen ones may have trained in bf16.
        trained.vae.to(trained.unet.dtype)
        trained.text_encoder.to(trained.unet.dtype)
        return dict(unet=trained.unet, vae=trained.vae, text_encoder=trained.text_encoder,
                    tokenizer=self.pipeline.tokenizer, scheduler=self.pipeline.scheduler)

    def predictor(self, run: RunRecord, artifact: Artifact, options: PredictOptions):
        from finetune.tasks.text_to_image.predict import ImagePredictor

        return ImagePredictor(run, artifact, options)

    # -- card -----------------------------------------------------------------------------
    def card(self, run: RunRecord, artifact: Artifact) -> CardInfo:
        options = run.recipe.task_options
        return CardInfo(
            pipeline_tag="text-to-image",
            library_name="diffusers",
            usage=card.usage(run, artifact),
            description=f"generates {options.resolution}×{options.resolution} images from text prompts",
            tags=["text-to-image", "diffusers", "stable-diffusion", "stable-diffusion-diffusers", "diffusers-training"],
            sections=card.sample_sections(run),
            limitations=skipped_images_note(run),
        )
