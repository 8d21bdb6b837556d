"""Text-to-image fine-tuning of Stable Diffusion (1.x and 2.x pipelines) through diffusers.

Columns (rename yours with `data.columns`): `image` and `text`, its caption (a string, or a
list of strings: training draws one at random, evaluation takes the first). A local image folder
gets its captions from a metadata.jsonl / metadata.csv beside the images (`datasets`' imagefolder).

Only the UNet trains (LoRA on its attention projections, or all of it); the text encoder joins
with `train_text_encoder`; the VAE never does. The loss is the standard noise-prediction objective
in the scheduler's own parameterisation (epsilon or v-prediction), see finetune.diffusion.
Evaluation reports a loss at fixed timesteps and fixed noise per example, and the run ends by
drawing the recipe's validation prompts with fixed seeds (samples/, a grid in the card).

A LoRA run saves diffusers' LoRA format (`pipeline.load_lora_weights(RUN/model)`); a full run
saves a whole pipeline folder (`StableDiffusionPipeline.from_pretrained(RUN/model)`).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

from finetune.api import Artifact, CardInfo, RunRecord, TaskModel
from finetune.columns import require_columns
from finetune.errors import DataError, FinetuneError
from finetune.images import check_images, open_image, skipped_images_note

if TYPE_CHECKING:
    from datasets import DatasetDict

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' Attention projections
TEXT_ENCODER_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP's
SAMPLES_FILE = "samples.json"
GRID = "samples.png"


class TextToImageOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    resolution: int = Field(512, ge=8, description="Training images are resized (shorter side) and cropped to this square size; a multiple of 8.")
    center_crop: bool = Field(True, description="Crop the centre of each image; false crops at random (training only).")
    random_flip: bool = Field(True, description="Flip training images horizontally with probability 0.5.")
    train_text_encoder: bool = Field(
        False, description="Also train the text encoder (LoRA on its attention, or all of it with the full method)."
    )
    snr_gamma: float | None = Field(
        None, gt=0, description="Min-SNR loss weighting with this gamma (5.0 is the paper's); null: the plain MSE."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less memory, about 20% slower.")
    precompute_latents: bool = Field(
        False, description="Encode every image with the VAE once before training (faster epochs; a training image keeps "
        "the one crop and flip drawn then)."
    )
    eval_timesteps: list[int] = Field(
        [100, 300, 500, 700, 900], min_length=1,
        description="Timesteps at which every eval example is noised (with noise fixed per example) for the validation loss.",
    )
    validation_prompts: list[str] = Field(default_factory=list, description="Prompts drawn after training, into samples/ and the card.")
    sample_seeds: list[int] = Field([0], min_length=1, description="One image per prompt and seed.")
    sample_steps: int = Field(30, ge=1, description="Inference steps per sample.")
    guidance_scale: float = Field(7.5, ge=0, description="Classifier-free guidance scale of the samples.")
    skip_unreadable_images: bool = Field(  # named as finetune.images.SKIP_OPTION, which its errors suggest
        False, description="Skip (and count) images that cannot be decoded instead of stopping with an error naming them."
    )

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"{value} is not a multiple of 8 (the VAE downsamples by 8); try {value - value % 8 or 8}")
        return value


class TextToImage:
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
                if not _is_caption(caption):
                    raise DataError(
                        f"The 'text' column of the {role} split holds {caption!r} in row {row}, not a caption: each "
                        "image needs a string (or a list of strings). Fix or remove that row."
                    )
        splits, skipped = check_images(splits, "image", skip=self.options.skip_unreadable_images)
        self.facts = {"unreadable_images_skipped": skipped} if skipped else {}
        return splits

    def data_facts(self) -> dict:
        return self.facts

    # -- model ----------------------------------------------------------------------------
    def build_model(self, source: str, revision: str | None) -> TaskModel:
        from diffusers import DDPMScheduler, StableDiffusionPipeline

        from finetune.diffusion import PREDICTION_TYPES, DiffusionModel

        try:
            pipeline = StableDiffusionPipeline.from_pretrained(
                source, revision=revision, safety_checker=None, requires_safety_checker=False
            )
        except Exception as exc:
            raise FinetuneError(
                f"model.name: diffusers could not load a Stable Diffusion pipeline from '{source}': {type(exc).__name__}: "
                f"{exc}. Name a Stable Diffusion 1.x/2.x repo (stable-diffusion-v1-5/stable-diffusion-v1-5) or a folder "
                "written by its save_pretrained (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."
            ) from None
        noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        prediction_type = noise_scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise FinetuneError(
                f"model.name: the scheduler of '{source}' predicts '{prediction_type}'; this task trains "
                f"{' or '.join(PREDICTION_TYPES)} models."
            )
        too_late = [t for t in self.options.eval_timesteps if not 0 <= t < noise_scheduler.config.num_train_timesteps]
        if too_late:
            raise FinetuneError(
                f"task.options.eval_timesteps: {too_late} lie outside this scheduler's timesteps "
                f"0..{noise_scheduler.config.num_train_timesteps - 1}."
            )
        self.pipeline, self.source, self.revision = pipeline, source, revision
        train_text = self.options.train_text_encoder
        if self.options.gradient_checkpointing:
            pipeline.unet.enable_gradient_checkpointing()
            if train_text:
                # Non-reentrant: with reentrant checkpointing the frozen encoder's LoRA layers get no gradient.
                pipeline.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = DiffusionModel(pipeline.unet, pipeline.vae, pipeline.text_encoder, noise_scheduler, self.options.snr_gamma)
        return TaskModel(
            model=model,
            head=[],  # nothing is new: every trained weight is pretrained
            lora_targets=UNET_ATTENTION + (TEXT_ENCODER_ATTENTION if train_text else []),
            frozen=["vae"] + ([] if train_text else ["text_encoder"]),
        )

    def preprocess(self, splits: DatasetDict, task_model: TaskModel) -> DatasetDict:
        from datasets import DatasetDict

        prepared = {}
        for role, split in splits.items():
            training = role == "train"
            if not training:  # the fixed noise of the validation loss: one seed per example
                split = split.add_column("noise_seed", list(range(len(split))))
            examples = _Examples(self.pipeline.tokenizer, self.options, training=training)
            if self.options.precompute_latents:
                prepared[role] = _encode_latents(split, examples, task_model.model.vae, self._fingerprint(split))
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
        prompts, seeds = self.options.validation_prompts, self.options.sample_seeds
        if not prompts:
            return
        import torch
        from diffusers import StableDiffusionPipeline
        from tqdm.auto import tqdm

        # No safety checker: the samples show what the model draws (the saved pipeline keeps the base's).
        pipeline = StableDiffusionPipeline(**self._components(model), safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        pipeline.set_progress_bar_config(disable=True)
        entries = []
        with tqdm(total=len(prompts) * len(seeds), desc="Sampling", unit="image") as bar:
            for row, prompt in enumerate(prompts):
                for seed in seeds:
                    image = pipeline(
                        prompt, height=self.options.resolution, width=self.options.resolution,
                        num_inference_steps=self.options.sample_steps, guidance_scale=self.options.guidance_scale,
                        generator=torch.Generator("cpu").manual_seed(seed),
                    ).images[0]
                    name = f"{row:02d}-seed{seed}.png"
                    image.save(directory / name)
                    entries.append({"prompt": prompt, "seed": seed, "file": name})
                    bar.update(1)
        settings = {key: getattr(self.options, key) for key in ("resolution", "sample_steps", "guidance_scale")}
        (directory / SAMPLES_FILE).write_text(json.dumps({**settings, "images": entries}, indent=2))

    def save(self, model, directory: Path, *, adapter: bool) -> None:
        from diffusers import StableDiffusionPipeline

        from finetune.diffusion import lora_layers

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
            pipeline = StableDiffusionPipeline.from_pretrained(self.source, revision=self.revision, **self._components(model))
            pipeline.save_pretrained(directory)

    def _components(self, model) -> dict:
        """The pipeline's components, with the trained UNet and text encoder of `model` in place."""
        from finetune.diffusion import diffusion_model_of

        trained = diffusion_model_of(model).eval()
        return dict(unet=trained.unet, vae=trained.vae, text_encoder=trained.text_encoder,
                    tokenizer=self.pipeline.tokenizer, scheduler=self.pipeline.scheduler)

    def card(self, run: RunRecord, artifact: Artifact) -> CardInfo:
        options = run.recipe.task_options
        return CardInfo(
            pipeline_tag="text-to-image",
            library_name="diffusers",
            usage=_usage(run, artifact),
            description=f"generates {options.resolution}×{options.resolution} images from text prompts",
            tags=["text-to-image", "diffusers", "stable-diffusion", "stable-diffusion-diffusers",
                  *(["lora", "diffusers-training"] if artifact.adapter else ["diffusers-training"])],
            sections=_sample_sections(run),
            limitations=skipped_images_note(run),
        )

    def _fingerprint(self, split) -> str:
        """The cache key of the pre-computed latents: the data, the VAE and every setting that changes them."""
        options = self.options.model_dump(include={"resolution", "center_crop", "random_flip"})
        key = json.dumps([split._fingerprint, self.source, self.revision, options], default=str)
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def _is_caption(value) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value))


class _Examples:
    """Decode, resize, crop (and flip) a batch of images to [-1, 1] and tokenise its captions with
    the pipeline's own tokenizer. A class, not a closure, so DataLoader workers can receive it."""

    def __init__(self, tokenizer, options: TextToImageOptions, *, training: bool):
        from torchvision import transforms

        size = options.resolution
        crop = transforms.CenterCrop(size) if options.center_crop or not training else transforms.RandomCrop(size)
        steps = [transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR), crop]
        if training and options.random_flip:
            steps.append(transforms.RandomHorizontalFlip())
        self.transform = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
        self.tokenizer, self.training = tokenizer, training

    def __call__(self, batch: dict) -> dict:
        captions = [c if isinstance(c, str) else (random.choice(c) if self.training else c[0]) for c in batch["text"]]
        tokens = self.tokenizer(
            captions, max_length=self.tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
        )
        out = {"pixel_values": [self.transform(open_image(v)) for v in batch["image"]], "input_ids": list(tokens.input_ids)}
        if "noise_seed" in batch:
            out["noise_seed"] = batch["noise_seed"]
        return out


def _encode_latents(split, examples: _Examples, vae, fingerprint: str):
    """Replace each image by its VAE latent distribution (mean and log-variance), cached by `datasets`:
    training samples from it at every step, exactly as it would from a freshly encoded image."""
    import torch
    from accelerate import PartialState

    device = PartialState().device  # this process's accelerator, or the CPU when the run is forced onto it
    vae.to(device)

    def encode(batch):
        out = examples(batch)
        with torch.no_grad():
            pixels = torch.stack(out.pop("pixel_values")).to(device)
            out["latent_parameters"] = vae.encode(pixels).latent_dist.parameters.float().cpu().numpy()
        out["input_ids"] = torch.stack(out["input_ids"]).numpy()
        return out

    encoded = split.map(
        encode, batched=True, batch_size=16, remove_columns=split.column_names, new_fingerprint=fingerprint,
        desc="Encoding latents",
    )
    vae.to("cpu")
    return encoded.with_format("torch")


def _samples(run: RunRecord) -> dict | None:
    path = run.samples_dir / SAMPLES_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _sample_sections(run: RunRecord) -> list[str]:
    """The samples as one grid (a row per prompt, a column per seed) and the prompts it shows."""
    from PIL import Image

    samples = _samples(run)
    if not samples or not samples["images"]:
        return []
    prompts = list(dict.fromkeys(e["prompt"] for e in samples["images"]))
    seeds = list(dict.fromkeys(e["seed"] for e in samples["images"]))
    tiles = {(e["prompt"], e["seed"]): Image.open(run.samples_dir / e["file"]) for e in samples["images"]}
    width, height = next(iter(tiles.values())).size
    grid = Image.new("RGB", (width * len(seeds), height * len(prompts)), "white")
    for (prompt, seed), tile in tiles.items():
        grid.paste(tile, (seeds.index(seed) * width, prompts.index(prompt) * height))
    run.images_dir.mkdir(parents=True, exist_ok=True)
    grid.save(run.images_dir / GRID)
    rows = "\n".join(f"| {i + 1} | {prompt} |" for i, prompt in enumerate(prompts))
    return [
        "## Samples\n\n"
        f"![Samples: one row per prompt, one column per seed]({run.images_dir.name}/{GRID})\n\n"
        f"Drawn after training with seeds {', '.join(map(str, seeds))} (one column each), {samples['sample_steps']} steps, "
        f"guidance scale {samples['guidance_scale']}, {samples['resolution']}×{samples['resolution']}; "
        "the usage snippet below draws the first one with the same settings (on the device that trained "
        "it, pixel for pixel; samples are drawn without a safety checker).\n\n"
        f"| row | prompt |\n|---|---|\n{rows}\n"
    ]


def _usage(run: RunRecord, artifact: Artifact) -> str:
    options = run.recipe.task_options
    samples = _samples(run)
    first = samples["images"][0] if samples and samples["images"] else {"prompt": "a photo", "seed": 0}
    where = json.dumps(artifact.location) + (f', subfolder="{artifact.subfolder}"' if artifact.subfolder else "")
    if artifact.adapter:
        base = run.summary.get("base_model", {})
        revision = f", revision={json.dumps(run.recipe.model.revision)}" if run.recipe.model.revision else ""
        load = (f"pipeline = StableDiffusionPipeline.from_pretrained({json.dumps(base.get('location') or base.get('name'))}{revision})\n"
                f"pipeline.load_lora_weights({where})")
    else:
        load = f"pipeline = StableDiffusionPipeline.from_pretrained({where})"
    return f"""\
import torch
from diffusers import StableDiffusionPipeline

{load}
image = pipeline(
    {json.dumps(first["prompt"])},
    height={options.resolution}, width={options.resolution},
    num_inference_steps={options.sample_steps}, guidance_scale={options.guidance_scale},
    generator=torch.Generator("cpu").manual_seed({first["seed"]}),
).images[0]
image.save("image.png")
"""
