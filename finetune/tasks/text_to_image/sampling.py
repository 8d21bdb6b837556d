"""Drawing the recipe's validation prompts with the trained pipeline, with fixed seeds, for the card."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.tasks.text_to_image.card import SAMPLES_FILE
from finetune.tasks.text_to_image.options import TextToImageOptions


def draw_samples(components: dict, options: TextToImageOptions, directory: Path) -> None:
    """One image per prompt and seed into `directory`, and samples.json saying what each one is."""
    prompts, seeds = options.validation_prompts, options.sample_seeds
    if not prompts:
        return
    import torch
    from diffusers import StableDiffusionPipeline
    from tqdm.auto import tqdm

    # No safety checker: the samples show what the model draws (the saved pipeline keeps the base's).
    pipeline = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    entries = []
    with tqdm(total=len(prompts) * len(seeds), desc="Sampling", unit="image") as bar:
        for row, prompt in enumerate(prompts):
            for seed in seeds:
                image = pipeline(
                    prompt, height=options.resolution, width=options.resolution,
                    num_inference_steps=options.sample_steps, guidance_scale=options.guidance_scale,
                    generator=torch.Generator("cpu").manual_seed(seed),
                ).images[0]
                name = f"{row:02d}-seed{seed}.png"
                image.save(directory / name)
                entries.append({"prompt": prompt, "seed": seed, "file": name})
                bar.update(1)
    settings = {key: getattr(options, key) for key in ("resolution", "sample_steps", "guidance_scale")}
    (directory / SAMPLES_FILE).write_text(json.dumps({**settings, "images": entries}, indent=2))
