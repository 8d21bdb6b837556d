"""Prompts → images with the saved pipeline, loaded as the card's snippet loads it, for `finetune predict`
and the check before a push (which redraws the run's samples and compares them)."""

from __future__ import annotations

from pathlib import Path

from finetune.api import Artifact, BasePredictor, PredictOptions, RunRecord
from finetune.errors import FinetuneError
from finetune.tasks.text_to_image.card import samples_of

SAME_IMAGE = 2.0
"""Mean absolute difference (of 255) below which a redrawn sample is the run's own: a merged adapter draws
within rounding of the unmerged one, a broken or missing adapter draws another picture altogether."""


class ImagePredictor(BasePredictor):
    column = "prompt"

    def __init__(self, run: RunRecord, artifact: Artifact, options: PredictOptions):
        task_options = run.recipe.task_options
        self.options, self.resolution = options, task_options.resolution
        self.steps = options.steps or task_options.sample_steps
        self.guidance = task_options.guidance_scale if options.guidance is None else options.guidance
        self.pipeline = _load(run, artifact).to(options.device)
        self.pipeline.set_progress_bar_config(disable=True)
        self.drawn = 0  # inputs without a seed of their own take options.seed, +1, +2 ...

    def read(self, row: dict) -> tuple[str, int]:
        prompt, seed = row.get("prompt", row.get("text")), row.get("seed")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty")
        if seed is not None and not isinstance(seed, int):
            raise ValueError(f"the seed {seed!r} is not an integer")
        if seed is None:
            seed, self.drawn = self.options.seed + self.drawn, self.drawn + 1
        return prompt, seed

    def predict(self, inputs: list[tuple[str, int]]) -> list[dict]:
        """`prediction`: the PNG's name in options.files_dir."""
        import torch

        if self.options.files_dir is None:
            raise FinetuneError("text-to-image predictions are image files: name where they go (--output FILE.jsonl "
                                "writes them into FILE's folder).")
        results = []
        for prompt, seed in inputs:  # one at a time: each image's generator is seeded on its own
            image = self.pipeline(prompt, height=self.resolution, width=self.resolution, num_inference_steps=self.steps,
                                  guidance_scale=self.guidance, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
            path = Path(self.options.files_dir) / f"{_slug(prompt)}-seed{seed}.png"
            image.save(path)
            results.append({"prediction": path.name, "prompt": prompt, "seed": seed, "steps": self.steps,
                            "guidance": self.guidance})
        return results

    def references(self, run: RunRecord, limit: int) -> list[tuple[dict, str]]:
        samples = samples_of(run) or {"images": []}
        if (samples.get("sample_steps"), samples.get("guidance_scale")) != (self.steps, self.guidance):
            return []  # drawn with other settings: nothing to compare with
        return [({"prompt": e["prompt"], "seed": e["seed"]}, str(run.samples_dir / e["file"])) for e in samples["images"][:limit]]

    def agrees(self, expected: str, predicted: str) -> bool:
        import numpy as np
        from PIL import Image

        drawn = Path(self.options.files_dir) / predicted
        a, b = (np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in (expected, drawn))
        return a.shape == b.shape and float(np.abs(a - b).mean()) < SAME_IMAGE


def _load(run: RunRecord, artifact: Artifact):
    from diffusers import StableDiffusionPipeline

    folder = str(Path(artifact.location) / (artifact.subfolder or ""))
    try:
        if not artifact.adapter:
            return StableDiffusionPipeline.from_pretrained(folder)
        base = run.summary.get("base_model", {})
        pipeline = StableDiffusionPipeline.from_pretrained(base.get("location") or base.get("name"), revision=run.recipe.model.revision)
        pipeline.load_lora_weights(folder)
        return pipeline
    except Exception as exc:
        raise FinetuneError(f"could not load the pipeline in {folder} as its card does ({type(exc).__name__}: {exc}); "
                            "check that the folder is complete.") from None


def _slug(prompt: str) -> str:
    kept = "".join(c if c.isalnum() else "-" for c in prompt.lower()).strip("-")
    return "-".join(part for part in kept.split("-") if part)[:40] or "prompt"
