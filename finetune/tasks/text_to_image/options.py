"""The recipe's `task.options` for text-to-image."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from finetune.images import ImageOptions


class TextToImageOptions(ImageOptions):
    resolution: int = Field(512, ge=8, description="Training images are resized (shorter side) and cropped to this square size; a multiple of 8.")
    center_crop: bool = Field(True, description="Crop the centre of each image; false crops at random (training only).")
    random_flip: bool = Field(True, description="Flip training images horizontally with probability 0.5.")
    train_text_encoder: bool = Field(
        False, description="Also train the text encoder (LoRA on its attention, or all of it with the full method)."
    )
    snr_gamma: float | None = Field(
        None, gt=0, description="Min-SNR loss weighting with this gamma (5.0 is the paper's); null: the plain MSE."
    )
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

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data):
        if isinstance(data, dict) and "gradient_checkpointing" in data:
            raise ValueError("gradient_checkpointing is now a key of every task: move it to train.gradient_checkpointing")
        return data

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"{value} is not a multiple of 8 (the VAE downsamples by 8); try {value - value % 8 or 8}")
        return value
