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

The package, by concern: `options` (the recipe's task.options), `data` (captions, image
transforms, cached latents), `model` (the pipeline as one trainable module, its loss, its LoRA
layers), `sampling` (drawing the validation prompts), `card` (the sample grid and usage snippet),
and `task`, which puts them together as the plugin.
"""

from finetune.tasks.text_to_image.task import TextToImage

__all__ = ["TextToImage"]
