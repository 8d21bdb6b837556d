"""Builders for tests: tiny models, tiny datasets and recipes, offline and in seconds, and the
conformance check for plugins.

Used by finetune's own test suite and meant for plugin authors' suites too. Models are built
from configs and written with `save_pretrained`, so tests exercise the real loading path.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

# Re-exported for plugin authors: running recipes in a test, and the conformance check.
from finetune.conformance import (  # noqa: F401
    ConformanceError,
    check_conformance,
    fresh_accelerate_state,
    run_recipe,
    write_recipe,
)

# For a test session's os.environ, before any Hugging Face library is imported: no network, less noise.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
}

RUN_OUTPUTS = ("model", "model-merged", "samples", "images", "metrics.json", "predictions.json", "example_losses.json", "README.md")


def rewind_run(finished: Path, copy: Path, step: int | None = None) -> Path:
    """A copy of a finished run as a crash right after the checkpoint of `step` (default: the first)
    leaves it: that checkpoint and older ones, the step log so far (a resume truncates it), no outputs.
    The copy's recipe.yaml names the copy as its output.dir, so `--resume` with it continues the copy."""
    shutil.copytree(finished, copy)
    recipe = copy / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace(str(finished), str(copy)))
    saved = sorted((copy / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    step = int(saved[0].name.split("-")[1]) if step is None else step
    for checkpoint in saved:
        if int(checkpoint.name.split("-")[1]) > step:
            shutil.rmtree(checkpoint)
    for name in RUN_OUTPUTS:
        target = copy / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    return copy


POSITIVE = ["great", "wonderful", "excellent", "loved", "superb", "fantastic", "delightful", "brilliant"]
NEGATIVE = ["terrible", "awful", "boring", "hated", "dreadful", "poor", "horrible", "disappointing"]
FILLER = ["the", "movie", "food", "service", "was", "really", "quite", "very", "and", "staff", "hotel",
          "book", "plot", "we", "it", "room", "our", "trip", "music", "so"]
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def sentiment_examples(n: int, seed: int = 0, labels: tuple[str, str] = ("negative", "positive")) -> list[dict]:
    """Balanced, shuffled short texts whose label is given by their sentiment words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, rng.randint(3, 6))
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append({"text": " ".join(words), "label": labels[label]})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_tokenizer(directory: Path, *, with_token_types: bool, words: list[str] | None = None, vocab_size: int = 200):
    """A lowercasing WordPiece tokenizer trained on `words` (default: the sentiment vocabulary),
    saved so AutoTokenizer loads it. Words it learned too rarely are split into sub-words."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    corpus = [" ".join(words or POSITIVE + NEGATIVE + FILLER)] * 4
    tokenizer.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"] if with_token_types else ["input_ids", "attention_mask"],
    )
    wrapped.save_pretrained(directory)
    return wrapped


def tiny_text_model(directory: Path, model_type: str = "distilbert", seed: int = 0, words: list[str] | None = None,
                    vocab_size: int = 200, dropout: float | None = None) -> Path:
    """A randomly initialised 2-layer encoder (no task head) and its tokenizer, trained on `words`
    (default: the sentiment vocabulary) with at most `vocab_size` tokens (a small one splits
    words into sub-words). Loads with any Auto class that adds a head. `dropout` sets every dropout
    rate, the head's included (0 for runs compared number for number; default: the library's)."""
    import torch
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

    directory = Path(directory)
    tokenizer = tiny_tokenizer(directory, with_token_types=model_type == "bert", words=words, vocab_size=vocab_size)
    torch.manual_seed(seed)
    if model_type == "distilbert":
        rates = {} if dropout is None else {"dropout": dropout, "attention_dropout": dropout, "seq_classif_dropout": dropout}
        config = DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                  max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id, **rates)
        model = DistilBertModel(config)
    elif model_type == "bert":
        rates = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout,
                                            "classifier_dropout": dropout}
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id, **rates)
        model = BertModel(config)
    else:
        raise ValueError(f"unknown tiny model type {model_type!r}; use 'distilbert' or 'bert'")
    model.save_pretrained(directory)
    return directory


def write_distribution(site: Path, name: str, version: str, entry_points: dict[str, dict[str, str]],
                       files: dict[str, str] | None = None) -> Path:
    """An installed distribution without pip, to test how plugins are found and reported: a
    dist-info folder with `entry_points` ({group: {name: target}}) and source `files` ({relative
    path: text}) in `site`. Put `site` on sys.path or PYTHONPATH to install it."""
    site = Path(site)
    for relative, text in (files or {}).items():
        (site / relative).parent.mkdir(parents=True, exist_ok=True)
        (site / relative).write_text(text)
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{key} = {target}\n" for key, target in targets.items())
        for group, targets in entry_points.items()
    ))
    return site


def text_recipe(model_dir: Path, data_dir: Path, run_dir: Path, method_name: str = "full", **sections) -> dict:
    """A recipe for a quick text-classification run on `sentiment_examples` files."""
    recipe = {
        "name": f"tiny-{method_name}",
        "task": {"name": "text-classification", "options": {"max_length": 32}},
        "model": {"name": str(model_dir)},
        "data": {"files": {"train": str(data_dir / "train.jsonl"), "test": str(data_dir / "test.jsonl")}},
        "method": {"name": method_name},
        "train": {"epochs": 5, "batch_size": 16, "lr": 5e-3, "log_every_steps": 3, "seed": 7},
        "output": {"dir": str(run_dir)},
    }
    return _with_sections(recipe, sections)


# -- images ---------------------------------------------------------------------------------
COLORS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 60, 200)}


def color_images(n: int, seed: int = 0, size: int = 24, colors: dict = COLORS) -> list[tuple]:
    """(PIL image, label) pairs, balanced: noisy pictures whose dominant colour is their label."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = list(colors)
    pairs = []
    for i in range(n):
        label = names[i % len(names)]
        pixels = rng.normal(colors[label], 45, size=(size, size, 3))
        pairs.append((Image.fromarray(pixels.clip(0, 255).astype("uint8")), label))
    return pairs


def write_image_folder(root: Path, splits: dict[str, list[tuple]]) -> Path:
    """An imagefolder dataset: root/<split>/<label>/<n>.png for each (image, label) pair."""
    root = Path(root)
    for split, pairs in splits.items():
        for i, (image, label) in enumerate(pairs):
            path = root / split / label / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
    return root


def tiny_timm_model(directory: Path, architecture: str = "test_resnet", *, num_classes: int = 10,
                    image_size: int = 32, seed: int = 0) -> Path:
    """A randomly initialised timm model, one of timm's tiny `test_*` architectures (test_resnet,
    test_vit, test_convnext ...), saved in timm's Hub format with a `image_size` data config."""
    import timm
    import torch
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    extra = {"img_size": image_size} if "vit" in architecture else {}  # position embeddings follow the size
    model = timm.create_model(architecture, pretrained=False, num_classes=num_classes,
                              pretrained_cfg_overlay={"input_size": (3, image_size, image_size)}, **extra)
    save_for_hf(model, directory, safe_serialization=True)
    return Path(directory)


def image_recipe(model_dir: Path, data_dir: Path, run_dir: Path, method_name: str = "full", **sections) -> dict:
    """A recipe for a quick image-classification run on an image folder."""
    recipe = {
        "name": f"tiny-image-{method_name}",
        "task": {"name": "image-classification", "options": {"augmentation": None}},
        "model": {"name": str(model_dir)},
        "data": {"path": str(data_dir)},
        "method": {"name": method_name},
        "train": {"epochs": 4, "batch_size": 16, "lr": 3e-3, "log_every_steps": 2, "seed": 7},
        "output": {"dir": str(run_dir)},
    }
    return _with_sections(recipe, sections)


def _with_sections(recipe: dict, sections: dict) -> dict:
    """Each given section's keys replace the recipe's (one level deep: `train={"lr": 1e-3}` keeps the other train keys)."""
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


# -- text to image --------------------------------------------------------------------------
def captioned_images(n: int, seed: int = 0, size: int = 32) -> list[tuple]:
    """(PIL image, caption) pairs: noisy pictures of one colour, captioned with its name."""
    return [(image, f"a {label} square") for image, label in color_images(n, seed=seed, size=size)]


def write_captioned_folder(root: Path, pairs: list[tuple], metadata: str = "metadata.jsonl") -> Path:
    """An imagefolder dataset with captions: root/<n>.png and a metadata.jsonl (or .csv) with
    `file_name` and `text` per image, as `datasets`' imagefolder reads them."""
    import csv

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image, caption) in enumerate(pairs):
        image.save(root / f"{i:04d}.png")
        rows.append({"file_name": f"{i:04d}.png", "text": caption})
    if metadata.endswith(".csv"):
        with open(root / metadata, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["file_name", "text"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        write_jsonl(root / metadata, rows)
    return root


def tiny_stable_diffusion(directory: Path, *, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """A randomly initialised Stable Diffusion pipeline (UNet ~1M parameters, a 2-block VAE, a
    2-layer CLIP text encoder with a BPE tokenizer trained on the captions' words), written with
    `save_pretrained`. Draws 32×32 images in a fraction of a second on a CPU."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    bpe = Tokenizer(models.BPE(unk_token=eos, end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.decoder = decoders.BPEDecoder(suffix="</w>")
    words = ["a", "photo", "of", "square", "on", "white", *COLORS]
    bpe.train_from_iterator([" ".join(words)] * 4, trainers.BpeTrainer(vocab_size=100, special_tokens=[bos, eos], end_of_word_suffix="</w>"))
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, bpe.token_to_id(bos)), (eos, bpe.token_to_id(eos))]
    )
    tokenizer = CLIPTokenizer(tokenizer_object=bpe, bos_token=bos, eos_token=eos, unk_token=eos, pad_token=eos, model_max_length=16)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
    )
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                              clip_sample=False, prediction_type=prediction_type)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(directory)
    return Path(directory)


def text_to_image_recipe(model_dir: Path, data_dir: Path, run_dir: Path, method_name: str = "lora", **sections) -> dict:
    """A recipe for a quick text-to-image run on a captioned image folder, with two validation prompts."""
    recipe = {
        "name": f"tiny-sd-{method_name}",
        "task": {"name": "text-to-image", "options": {
            "resolution": 16, "eval_timesteps": [100, 500, 900], "validation_prompts": ["a red square", "a blue square"],
            "sample_seeds": [0, 1], "sample_steps": 2}},
        "model": {"name": str(model_dir)},
        "data": {"path": str(data_dir), "eval_fraction": 0.25},
        "method": {"name": method_name},
        "train": {"max_steps": 4, "batch_size": 4, "eval_batch_size": 4, "lr": 1e-3, "log_every_steps": 2, "seed": 7},
        "output": {"dir": str(run_dir)},
    }
    return _with_sections(recipe, sections)
