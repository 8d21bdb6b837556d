"""Text-to-image data: captions checked, images decoded, resized, cropped and flipped to the
UNet's resolution, captions tokenised, and (optionally) every image encoded by the VAE once."""

from __future__ import annotations

import hashlib
import json
import random

from finetune.images import open_image
from finetune.tasks.text_to_image.options import TextToImageOptions


def is_caption(value) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value))


class Examples:
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


def encode_latents(split, examples: Examples, vae, fingerprint: str):
    """Replace each image by its VAE latent distribution (mean and log-variance), cached by `datasets`:
    training samples from it at every step, exactly as it would from a freshly encoded image."""
    import torch
    from accelerate import PartialState

    device = PartialState().device  # this process's accelerator, or the CPU when the run is forced onto it
    vae.to(device)

    def encode(batch):
        out = examples(batch)
        with torch.no_grad():
            pixels = torch.stack(out.pop("pixel_values")).to(device, vae.dtype)  # bf16 under mixed precision
            out["latent_parameters"] = vae.encode(pixels).latent_dist.parameters.float().cpu().numpy()
        out["input_ids"] = torch.stack(out["input_ids"]).numpy()
        return out

    encoded = split.map(
        encode, batched=True, batch_size=16, remove_columns=split.column_names, new_fingerprint=fingerprint,
        desc="Encoding latents",
    )
    vae.to("cpu")
    return encoded.with_format("torch")


def latents_fingerprint(split, source: str, revision: str | None, options: TextToImageOptions, vae_dtype) -> str:
    """The cache key of the pre-computed latents: the data, the VAE (and the precision it encodes in) and every
    setting that changes them."""
    settings = options.model_dump(include={"resolution", "center_crop", "random_flip"})
    key = json.dumps([split._fingerprint, source, revision, settings, str(vae_dtype)], default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]
