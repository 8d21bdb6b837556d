"""The text-to-image card: the run's samples as one grid, and a snippet that draws the first one."""

from __future__ import annotations

import json

from finetune.api import Artifact, RunRecord

SAMPLES_FILE = "samples.json"  # written by sampling.write_samples beside the images
GRID = "samples.png"


def samples_of(run: RunRecord) -> dict | None:
    path = run.samples_dir / SAMPLES_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def sample_sections(run: RunRecord) -> list[str]:
    """The samples as one grid (a row per prompt, a column per seed) and the prompts it shows."""
    from PIL import Image

    samples = samples_of(run)
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


def usage(run: RunRecord, artifact: Artifact) -> str:
    options = run.recipe.task_options
    samples = samples_of(run)
    first = samples["images"][0] if samples and samples["images"] else {"prompt": "a photo", "seed": 0}
    where = artifact.loader_arguments()
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
