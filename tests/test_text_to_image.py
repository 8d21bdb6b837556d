"""Text-to-image on a tiny Stable Diffusion pipeline built from configs: LoRA and full runs end to
end through the CLI, reloading in diffusers with the same images as the run's samples, which
weights move, the loss's target and weighting, the fixed validation loss, and errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from finetune import testing
from finetune.cli import main

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    return testing.tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def captions_dir(tmp_path_factory) -> Path:
    return testing.write_captioned_folder(tmp_path_factory.mktemp("captions"), testing.captioned_images(16, size=24))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, sd_dir, captions_dir) -> Path:
    """A LoRA run through the CLI, with a merged copy (to see which weights moved)."""
    work = tmp_path_factory.mktemp("sd-lora")
    recipe = testing.text_to_image_recipe(sd_dir, captions_dir, work / "run", "lora", output={"merged": True})
    result = invoke("run", testing.write_recipe(work / "lora.yaml", recipe))
    assert result.exit_code == 0, result.output
    return work / "run"


def pipeline_from(path, **kwargs):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(path, **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def draw(pipeline, prompt: str, seed: int, samples: dict) -> np.ndarray:
    """What the run's sampler drew for (prompt, seed), with the settings samples.json records."""
    image = pipeline(
        prompt, height=samples["resolution"], width=samples["resolution"], num_inference_steps=samples["sample_steps"],
        guidance_scale=samples["guidance_scale"], generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    return np.asarray(image)


def state(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_lora_run_writes_a_diffusers_lora_samples_and_a_card(lora_run):
    summary = json.loads((lora_run / "metrics.json").read_text())
    assert math.isfinite(summary["metrics"]["eval"]["loss"]) and 0 < summary["metrics"]["eval"]["loss"] < 3
    assert summary["split_sizes"] == {"train": 12, "eval": 4}
    weights = load_file(lora_run / "model" / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith("unet.") and "lora" in k for k in weights)  # the text encoder was not asked for

    samples = json.loads((lora_run / "samples" / "samples.json").read_text())
    assert [(e["prompt"], e["seed"]) for e in samples["images"]] == [
        ("a red square", 0), ("a red square", 1), ("a blue square", 0), ("a blue square", 1)]
    for entry in samples["images"]:
        assert Image.open(lora_run / "samples" / entry["file"]).size == (16, 16)

    card = (lora_run / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "diffusers" and metadata["pipeline_tag"] == "text-to-image"
    assert {"text-to-image", "stable-diffusion", "lora", "diffusers"} <= set(metadata["tags"])
    assert "![Samples: one row per prompt, one column per seed](images/samples.png)" in card
    assert Image.open(lora_run / "images" / "samples.png").size == (2 * 16, 2 * 16)  # 2 seeds × 2 prompts
    assert "| 2 | a blue square |" in card
    assert "pipeline.load_lora_weights(" in card and "- loss:" in card


def test_the_saved_lora_reloads_in_diffusers_and_draws_the_runs_samples(lora_run, sd_dir):
    samples = json.loads((lora_run / "samples" / "samples.json").read_text())
    base = pipeline_from(sd_dir)
    before = {(e["prompt"], e["seed"]): draw(base, e["prompt"], e["seed"], samples) for e in samples["images"]}
    tuned = pipeline_from(sd_dir)
    tuned.load_lora_weights(lora_run / "model")
    for entry in samples["images"]:
        saved = np.asarray(Image.open(lora_run / "samples" / entry["file"]))
        assert np.array_equal(draw(tuned, entry["prompt"], entry["seed"], samples), saved)
        assert not np.array_equal(before[(entry["prompt"], entry["seed"])], saved)  # the adapter changed the image


def test_the_cards_usage_snippet_draws_the_first_sample(lora_run, tmp_path, monkeypatch):
    card = (lora_run / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "card-usage", "exec"), {})
    assert np.array_equal(np.asarray(Image.open(tmp_path / "image.png")),
                          np.asarray(Image.open(lora_run / "samples" / "00-seed0.png")))


def test_lora_moves_only_the_unets_attention(lora_run, sd_dir):
    base, merged = pipeline_from(sd_dir), pipeline_from(lora_run / "model-merged")
    assert changed(state(base.vae), state(merged.vae)) == set()
    assert changed(state(base.text_encoder), state(merged.text_encoder)) == set()
    moved = changed(state(base.unet), state(merged.unet))
    attention = {k for k in state(base.unet) if k.endswith(tuple(f"{m}.weight" for m in ATTENTION))}
    # 4 transformer blocks (down 1, mid 1, up 2) × 2 attentions × 4 projections, and nothing else
    assert moved == attention and len(moved) == 32

    rank = 8  # LoraOptions' default: each adapted Linear(in, out) adds r × (in + out) parameters
    linears = [m for n, m in base.unet.named_modules() if n.endswith(ATTENTION)]
    expected = sum(rank * (m.in_features + m.out_features) for m in linears)
    assert json.loads((lora_run / "metrics.json").read_text())["parameters"]["trainable"] == expected


def assert_every_lora_layer_trained(weights: dict) -> None:
    """LoRA's up-projection (lora_B / lora.up) starts at zero: a layer whose up-projection is still zero got no gradient."""
    ups = {k: v for k, v in weights.items() if "lora_B" in k or "lora.up" in k}
    assert ups and all(v.abs().sum() > 0 for v in ups.values()), [k for k, v in ups.items() if v.abs().sum() == 0]


def test_export_merges_the_saved_lora_into_the_pipeline_the_run_merged(lora_run, tmp_path):
    run = shutil.copytree(lora_run, tmp_path / "run")
    shutil.rmtree(run / "model-merged")
    result = invoke("export", run, "--merged")
    assert result.exit_code == 0, result.output
    for part in ("unet", "text_encoder", "vae"):  # the same weights as the run's own merge, bit for bit
        exported, written = (load_file(next((r / "model-merged" / part).glob("*.safetensors"))) for r in (run, lora_run))
        assert exported.keys() == written.keys() and all(torch.equal(exported[k], written[k]) for k in written), part
    assert "--onnx: the task 'text-to-image' has no ONNX export" in invoke("export", run, "--onnx").output


def test_lora_on_the_text_encoder_when_asked(sd_dir, captions_dir, tmp_path):
    recipe = testing.text_to_image_recipe(sd_dir, captions_dir, tmp_path / "run", "lora", output={"merged": True},
                                          train={"gradient_checkpointing": True})
    recipe["task"]["options"].update(train_text_encoder=True, validation_prompts=[])
    summary = testing.run_recipe(tmp_path / "r.yaml", recipe)
    weights = load_file(summary.model_dir / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in weights} == {"unet", "text_encoder"}
    assert_every_lora_layer_trained(weights)  # the text encoder's too, through its checkpointed layers
    assert not (summary.run_dir / "samples").exists()  # no prompts, no samples

    base, merged = pipeline_from(sd_dir), pipeline_from(summary.run_dir / "model-merged")
    assert changed(state(base.vae), state(merged.vae)) == set()
    moved = changed(state(base.text_encoder), state(merged.text_encoder))
    assert moved and all(k.endswith(tuple(f"{m}.weight" for m in CLIP_ATTENTION)) for k in moved)

    reloaded = pipeline_from(sd_dir)
    reloaded.load_lora_weights(summary.model_dir)
    reloaded.fuse_lora()
    assert changed(state(merged.text_encoder), {k.replace(".base_layer", ""): v for k, v in state(reloaded.text_encoder).items()
                                                 if "lora_" not in k}) == set()


def test_full_run_on_hub_style_parquet_saves_a_pipeline(sd_dir, tmp_path):
    """A Hub dataset of captioned images is parquet with an Image column (as lambdalabs/naruto-blip-captions)."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    pairs = testing.captioned_images(16, seed=3, size=24)
    table = Dataset.from_dict({"image": [p[0] for p in pairs], "text": [p[1] for p in pairs]},
                              features=Features({"image": ImageFeature(), "text": Value("string")}))
    table.to_parquet(tmp_path / "train.parquet")
    recipe = testing.text_to_image_recipe(sd_dir, tmp_path, tmp_path / "run", "full")
    recipe["data"] = {"files": {"train": str(tmp_path / "train.parquet")}, "eval_fraction": 0.25}
    recipe["task"]["options"].update(random_flip=False, center_crop=False)
    result = invoke("run", testing.write_recipe(tmp_path / "full.yaml", recipe))
    assert result.exit_code == 0, result.output

    run = tmp_path / "run"
    summary = json.loads((run / "metrics.json").read_text())
    assert math.isfinite(summary["metrics"]["eval"]["loss"])
    base, tuned = pipeline_from(sd_dir), pipeline_from(run / "model")
    assert summary["parameters"]["trainable"] == sum(p.numel() for p in base.unet.parameters())
    assert changed(state(base.vae), state(tuned.vae)) == set()
    assert changed(state(base.text_encoder), state(tuned.text_encoder)) == set()
    assert len(changed(state(base.unet), state(tuned.unet))) > 100  # the whole UNet trained

    samples = json.loads((run / "samples" / "samples.json").read_text())
    first = samples["images"][0]
    assert np.array_equal(draw(tuned, first["prompt"], first["seed"], samples), np.asarray(Image.open(run / "samples" / first["file"])))
    card = (run / "README.md").read_text()
    assert f'StableDiffusionPipeline.from_pretrained("{run / "model"}")' in card and "load_lora_weights" not in card


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_loss_targets_the_schedulers_prediction_type(tmp_path, prediction_type):
    from finetune.tasks.text_to_image.model import DiffusionModel

    sd = pipeline_from(testing.tiny_stable_diffusion(tmp_path / "sd", prediction_type=prediction_type))
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(sd.scheduler.config)
    model = DiffusionModel(sd.unet, sd.vae, sd.text_encoder, scheduler).eval()
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    ids = sd.tokenizer(["a red square", "a blue square"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, pixel_values=pixels, noise_seed=torch.tensor([3, 4]), timesteps=[250])
        latents = sd.vae.encode(pixels).latent_dist.mode() * sd.vae.config.scaling_factor
        noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
        t = torch.tensor([250, 250])
        prediction = sd.unet(scheduler.add_noise(latents, noise, t), t, sd.text_encoder(ids)[0]).sample
        target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
        expected = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, expected)


def test_min_snr_weights_follow_the_paper():
    from diffusers import DDPMScheduler

    from finetune.tasks.text_to_image.model import min_snr_weights

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    steps = torch.tensor([0, 50, 999])
    alphas = scheduler.alphas_cumprod[steps]
    snr = alphas / (1 - alphas)
    assert snr[0] > 5 > snr[2]  # the first is clipped, the last is not
    torch.testing.assert_close(min_snr_weights(scheduler, steps, 5.0, "epsilon"), torch.clamp(snr, max=5) / snr)
    torch.testing.assert_close(min_snr_weights(scheduler, steps, 5.0, "v_prediction"), torch.clamp(snr, max=5) / (snr + 1))
    assert min_snr_weights(scheduler, steps, 5.0, "epsilon")[2] == pytest.approx(1.0)


def test_the_validation_loss_is_fixed_and_precomputed_latents_give_the_same(sd_dir, captions_dir, tmp_path):
    """Same model, same eval split: the same loss whatever the global seed, with latents encoded
    on the fly or pre-computed once."""
    from accelerate import Accelerator

    from finetune import plugins
    from finetune.data import finish_splits, load_splits
    from finetune.metrics import Metrics
    from finetune.recipe import load_recipe
    from finetune.training.eval_loop import eval_loader, evaluate

    recipe_dict = testing.text_to_image_recipe(sd_dir, captions_dir, tmp_path / "run")
    losses = []
    for precompute, seed in ((False, 1), (False, 2), (True, 3)):
        recipe_dict["task"]["options"]["precompute_latents"] = precompute
        recipe = load_recipe(testing.write_recipe(tmp_path / f"r{precompute}.yaml", recipe_dict))
        task = plugins.load(plugins.TASKS, "text-to-image")(recipe.task_options)
        splits = finish_splits(task.prepare_data(load_splits(recipe)), recipe, None)
        task_model = task.build_model(str(sd_dir), None)
        eval_split = task.preprocess(splits, task_model)["eval"]
        assert ("latent_parameters" in eval_split.column_names) == precompute
        tokenizer = task.pipeline.tokenizer  # the pipeline's own, loaded from sd_dir/tokenizer
        assert type(tokenizer).__name__ == "CLIPTokenizer"
        expected = tokenizer(splits["eval"][0]["text"], padding="max_length", max_length=16, truncation=True).input_ids
        assert eval_split[0]["input_ids"].tolist() == expected
        torch.manual_seed(seed)
        result = evaluate(Accelerator(cpu=True), task_model.model, task, eval_loader(eval_split, recipe, task), Metrics([]))
        losses.append(result.metrics["loss"])
    assert losses[0] == losses[1]
    assert losses[2] == pytest.approx(losses[0], abs=1e-5)


def test_v_prediction_with_snr_weighting_precomputed_latents_checkpointing_and_bf16(tmp_path, captions_dir):
    sd = testing.tiny_stable_diffusion(tmp_path / "sd-v", prediction_type="v_prediction")
    recipe = testing.text_to_image_recipe(sd, captions_dir, tmp_path / "run", "lora",
                                          train={"mixed_precision": "bf16", "gradient_checkpointing": True})
    recipe["task"]["options"].update(snr_gamma=5.0, precompute_latents=True, validation_prompts=["a red square"], sample_steps=2)
    summary = testing.run_recipe(tmp_path / "r.yaml", recipe)
    steps = [json.loads(line) for line in (summary.run_dir / "logs" / "steps.jsonl").read_text().splitlines()]
    assert all(math.isfinite(s["loss"]) for s in steps if "loss" in s)
    assert math.isfinite(summary.metrics["eval"]["loss"])
    weights = load_file(summary.model_dir / "pytorch_lora_weights.safetensors")
    assert_every_lora_layer_trained(weights)  # gradients reached every adapter through the checkpointed blocks
    # The frozen VAE and text encoder trained in bf16; the LoRA layers stayed float32; sampling mixes them.
    dtypes = summary.parameters["dtypes"]
    assert set(dtypes["trainable"]) == {"float32"} and set(dtypes["frozen"]) == {"float32", "bfloat16"}
    assert list((summary.run_dir / "samples").glob("*.png"))


def test_the_text_to_image_task_conforms(sd_dir, tmp_path, monkeypatch):
    data = testing.write_captioned_folder(tmp_path / "data", testing.captioned_images(8, size=24), metadata="metadata.csv")
    recipe = testing.text_to_image_recipe(sd_dir, data, tmp_path / "unused", "lora", data={"eval_fraction": 0.25})
    monkeypatch.chdir(tmp_path)  # the card snippets write image.png
    runs = testing.check_conformance(recipe, tmp_path / "check")
    assert sorted(runs) == ["full", "lora"]  # feature extraction is not declared
    assert (tmp_path / "image.png").is_file()


# -- errors ---------------------------------------------------------------------------------
def test_feature_extraction_is_rejected_at_validation(sd_dir, captions_dir, tmp_path):
    recipe = testing.text_to_image_recipe(sd_dir, captions_dir, tmp_path / "run", "feature-extraction")
    result = invoke("validate", testing.write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert ("method.name: the task 'text-to-image' does not support the method 'feature-extraction'; "
            "it supports: lora, full") in result.output


def test_a_folder_without_captions_is_a_clear_error(sd_dir, tmp_path):
    data = testing.write_image_folder(tmp_path / "data", {"train": testing.color_images(8)})  # class folders, no metadata
    recipe = testing.text_to_image_recipe(sd_dir, data, tmp_path / "run")
    result = invoke("run", testing.write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "The train split has no 'text' column" in result.output
    assert "metadata.jsonl (or metadata.csv)" in result.output and "data.columns" in result.output
    assert not (tmp_path / "run").exists()


def test_a_renamed_caption_column_is_read(sd_dir, tmp_path):
    pairs = testing.captioned_images(8, size=24)
    data = testing.write_captioned_folder(tmp_path / "data", pairs)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    testing.write_jsonl(data / "metadata.jsonl", [{"file_name": r["file_name"], "caption": r["text"]} for r in rows])
    recipe = testing.text_to_image_recipe(sd_dir, data, tmp_path / "run", train={"max_steps": 1})
    recipe["task"]["options"]["validation_prompts"] = []
    result = invoke("run", testing.write_recipe(tmp_path / "plain.yaml", recipe))
    assert result.exit_code == 1 and "The train split has no 'text' column" in result.output
    recipe["data"]["columns"] = {"caption": "text"}
    result = invoke("run", testing.write_recipe(tmp_path / "renamed.yaml", recipe))
    assert result.exit_code == 0, result.output


def test_an_unreadable_image_is_named(sd_dir, captions_dir, tmp_path):
    data = shutil.copytree(captions_dir, tmp_path / "data")
    (data / "0003.png").write_bytes(b"not a png")
    recipe = testing.text_to_image_recipe(sd_dir, data, tmp_path / "run")
    result = invoke("run", testing.write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "1 of 16 images in the train split cannot be read" in result.output
    assert "0003.png (not an image file PIL can read)" in result.output
    assert not (tmp_path / "run").exists()


def test_a_missing_caption_is_named_with_its_row(sd_dir, captions_dir, tmp_path):
    data = shutil.copytree(captions_dir, tmp_path / "data")
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    rows[5]["text"] = None
    testing.write_jsonl(data / "metadata.jsonl", rows)
    recipe = testing.text_to_image_recipe(sd_dir, data, tmp_path / "run")
    result = invoke("run", testing.write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "The 'text' column of the train split holds None in row 5, not a caption" in result.output


def test_bad_options_are_named(sd_dir, captions_dir, tmp_path):
    recipe = testing.text_to_image_recipe(sd_dir, captions_dir, tmp_path / "run")
    recipe["task"]["options"].update(resolution=30)
    result = invoke("validate", testing.write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 1 and "task.options.resolution" in result.output and "multiple of 8" in result.output

    recipe["task"]["options"].update(resolution=16, eval_timesteps=[100, 1000])
    result = invoke("run", testing.write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 1 and "task.options.eval_timesteps: [1000] lie outside this scheduler's timesteps 0..999" in result.output
    assert not (tmp_path / "run").exists()


def test_named_lora_targets_never_reach_the_frozen_vae(sd_dir, captions_dir, tmp_path):
    """The VAE's attention has `to_q` too: a recipe naming it adapts only the UNet's."""
    recipe = testing.text_to_image_recipe(sd_dir, captions_dir, tmp_path / "run", "lora", train={"max_steps": 1},
                                          method={"options": {"target_modules": ["to_q"]}})
    recipe["task"]["options"]["validation_prompts"] = []
    summary = testing.run_recipe(tmp_path / "r.yaml", recipe)
    weights = load_file(summary.model_dir / "pytorch_lora_weights.safetensors")
    adapted = {k.rsplit(".lora", 1)[0] for k in weights}
    assert adapted and all(k.startswith("unet.") and k.endswith("to_q") for k in adapted)
    assert len(adapted) == 8  # 4 transformer blocks × 2 attentions


@pytest.mark.slow
def test_two_processes_train_in_step_and_write_the_samples_once(sd_dir, captions_dir, tmp_path):
    import subprocess
    import sys

    recipe = testing.text_to_image_recipe(sd_dir, captions_dir, tmp_path / "run", "lora")
    path = testing.write_recipe(tmp_path / "r.yaml", recipe)
    out = subprocess.run([sys.executable, "-m", "finetune", "run", str(path), "--processes", "2"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["environment"]["processes"] == 2
    assert summary["rank_checksums"][0] == summary["rank_checksums"][1]  # DDP synchronised the LoRA gradients
    assert_every_lora_layer_trained(load_file(tmp_path / "run" / "model" / "pytorch_lora_weights.safetensors"))
    assert math.isfinite(summary["metrics"]["eval"]["loss"])
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == [
        "00-seed0.png", "00-seed1.png", "01-seed0.png", "01-seed1.png", "samples.json"]


def test_pushed_card_loads_the_merged_pipeline_and_the_adapter_from_the_repo(lora_run, tmp_path, monkeypatch):
    """`hub.artifacts: both`: the merged pipeline at the repo's root, the LoRA in adapter/; each of
    the card's snippets, run against a local copy of the commit, draws the first sample."""
    import re

    from finetune.hub import PushTarget, prepare_push

    repo = "test-user/tiny-sd"
    plan = prepare_push(lora_run, PushTarget(repo, artifacts="both"))
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "adapter/pytorch_lora_weights.safetensors",
            "images/samples.png"} <= set(plan.files)
    mirror = tmp_path / "mirror"
    for path, source in plan.files.items():
        (mirror / path).parent.mkdir(parents=True, exist_ok=True)
        (mirror / path).write_bytes(source if isinstance(source, bytes) else source.read_bytes())
    card = plan.files["README.md"].decode()
    assert "pipeline_tag: text-to-image" in card and "library_name: diffusers" in card
    snippets = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(snippets) == 2 and f'load_lora_weights("{repo}", subfolder="adapter")' in snippets[1]
    sample = np.asarray(Image.open(lora_run / "samples" / "00-seed0.png")).astype(int)
    monkeypatch.chdir(tmp_path)
    for snippet in snippets:
        exec(snippet.replace(f'"{repo}"', f'"{mirror}"'), {})
        drawn = np.asarray(Image.open(tmp_path / "image.png")).astype(int)
        assert np.abs(drawn - sample).max() <= 2  # merged weights round differently from an unmerged adapter
    assert np.array_equal(drawn, sample)  # the adapter, last, exactly


def test_the_core_freezes_what_the_task_marks_frozen_whatever_the_method():
    """A method that makes everything trainable (as a third party's might) still leaves the VAE alone."""
    from finetune.api import BaseMethod, TaskModel
    from finetune.pipeline import _freeze
    from finetune.training.loop import train_mode

    model = torch.nn.Sequential()
    model.add_module("unet", torch.nn.Linear(2, 2))
    model.add_module("vae", torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)))
    model.requires_grad_(True)
    frozen = _freeze(TaskModel(model=model, head=[], adapter_targets=[], frozen=["vae"]), BaseMethod(), model)
    assert frozen == [model.vae]
    train_mode(model, frozen)  # as the training loop enters training mode
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["unet.weight", "unet.bias"]
    assert model.unet.training and not model.vae.training and not model.vae[1].training


def test_predict_redraws_the_runs_samples_and_the_round_trip_agrees(lora_run, tmp_path):
    from finetune.predict import artifact_of, check_round_trip
    from finetune.rundir import read_run

    samples = json.loads((lora_run / "samples" / "samples.json").read_text())
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": e["prompt"], "seed": e["seed"]}) + "\n" for e in samples["images"]))
    out = tmp_path / "drawn.jsonl"
    result = CliRunner().invoke(main, ["predict", str(lora_run), "--input-file", str(prompts), "-o", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["seed"], r["steps"]) for r in records] == [(e["prompt"], e["seed"], 2) for e in samples["images"]]
    for record, entry in zip(records, samples["images"]):
        drawn = np.asarray(Image.open(tmp_path / "drawn" / record["prediction"]))
        assert np.array_equal(drawn, np.asarray(Image.open(lora_run / "samples" / entry["file"])))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drawn", "drawn.jsonl", "prompts.jsonl"]

    run = read_run(lora_run)
    assert check_round_trip(run, [artifact_of(run)]) == ([], [])
    no_file = CliRunner().invoke(main, ["predict", str(lora_run), "a red square"])
    assert no_file.exit_code == 1 and "this task makes files: name where the results go with --output FILE.jsonl" in no_file.output
