"""Image classification with timm: every method on a CNN and a ViT end to end, reloading in timm
and peft, the frozen backbone, a transfer check on real digits, and errors on bad image folders."""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from finetune import testing
from finetune.cli import main

ARCHITECTURES = {"cnn": "test_resnet", "vit": "test_vit"}
METHODS = ["full", "feature-extraction", "lora"]
LABELS = ["blue", "green", "red"]  # imagefolder sorts the class folders


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def colors_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("colors")
    return testing.write_image_folder(root, {"train": testing.color_images(60, seed=1), "test": testing.color_images(30, seed=2)})


@pytest.fixture(scope="module")
def base_models(tmp_path_factory) -> dict[str, Path]:
    return {kind: testing.tiny_timm_model(tmp_path_factory.mktemp(kind), arch) for kind, arch in ARCHITECTURES.items()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, base_models, colors_dir):
    """Run (architecture, method) once per module; return its run directory."""
    work = tmp_path_factory.mktemp("image-runs")

    @functools.cache
    def run(kind: str, method: str) -> Path:
        run_dir = work / f"{kind}-{method}"
        recipe = testing.image_recipe(
            base_models[kind], colors_dir, run_dir, method,
            # The CNN trains with timm's default augmentation, the ViT without any.
            task={"options": {} if kind == "cnn" else {"augmentation": None}},
            output={"merged": method == "lora"},
        )
        result = invoke("run", testing.write_recipe(work / f"{kind}-{method}.yaml", recipe))
        assert result.exit_code == 0, result.output
        return run_dir

    return run


def test_preprocessing_follows_the_timm_data_config(base_models, colors_dir):
    from datasets import DatasetDict, load_dataset

    from finetune.tasks.image_classification import ImageClassification, ImageClassificationOptions

    task = ImageClassification(ImageClassificationOptions())
    splits = task.prepare_data(DatasetDict(load_dataset(str(colors_dir))))
    task_model = task.build_model(str(base_models["vit"]), None)
    processed = task.preprocess(splits, task_model)
    batch = task.collate([processed["test"][i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32)  # the saved data config's size, from 24x24 pictures
    assert batch["labels"].tolist() == splits["test"]["label"][:4]
    # Evaluation is deterministic; training draws a new augmentation each time.
    assert torch.equal(processed["test"][0]["pixel_values"], processed["test"][0]["pixel_values"])
    assert not torch.equal(processed["train"][0]["pixel_values"], processed["train"][0]["pixel_values"])
    assert task_model.head == ["head"] and "blocks.0.attn.qkv" in task_model.adapter_targets
    assert not any("patch_embed" in t for t in task_model.adapter_targets)  # ViT: attention and MLP layers only


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_run_end_to_end_and_reload(kind, method, finished_run, colors_dir, tmp_path, monkeypatch):
    run_dir = finished_run(kind, method)
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["split_sizes"] == {"train": 54, "eval": 6, "test": 30}
    assert set(summary["metrics"]["test"]) == {"loss", "accuracy", "macro_f1"}  # 3 classes: no top-5
    assert summary["data"]["task"]["labels"] == LABELS
    assert summary["data"]["folder"]["files"] == 90 and len(summary["data"]["folder"]["sha256"]) == 64
    trainable, total = summary["parameters"]["trainable"], summary["parameters"]["total"]
    assert trainable == total if method == "full" else 0 < trainable < total

    # The saved model predicts, in timm (and peft), what the run's own evaluation predicted.
    expected = json.loads((run_dir / "predictions.json").read_text())["test"]["predictions"]
    if method == "lora":
        assert predict_with_peft(run_dir / "model", colors_dir) == expected
        assert predict_with_timm(run_dir / "model-merged", colors_dir) == expected
    else:
        assert predict_with_timm(run_dir / "model", colors_dir) == expected
        config = json.loads((run_dir / "model" / "config.json").read_text())
        assert config["architecture"] == ARCHITECTURES[kind] and config["num_classes"] == 3
        assert config["label_names"] == LABELS
        assert config["pretrained_cfg"]["input_size"] == [3, 32, 32] and "mean" in config["pretrained_cfg"]

    card = (run_dir / "README.md").read_text()
    assert "library_name: timm" in card and "pipeline_tag: image-classification" in card
    assert "classifies images into 3 classes: blue, green, red" in card
    assert "![Confusion matrix on the test split](images/confusion-matrix-test.png)" in card
    # Every usage snippet on the card runs as written on an image and prints a known label.
    monkeypatch.chdir(tmp_path)
    testing.color_images(1, seed=5)[0][0].save("image.jpg")
    snippets = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(snippets) == (2 if method == "lora" else 1)
    for snippet in snippets:
        printed = []
        exec(snippet, {"print": lambda *args: printed.append(" ".join(map(str, args)))})
        assert len(printed) == 1 and printed[0].split()[0] in LABELS


def test_hub_style_dataset_with_embedded_images_renamed_columns_and_six_classes(base_models, tmp_path):
    """Parquet with an Image feature holding the bytes, as Hub datasets store images, under the
    column names cifar10 and beans use; six classes, so top-5 accuracy is reported."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    colors = {**testing.COLORS, "yellow": (210, 200, 40), "magenta": (200, 40, 200), "cyan": (40, 200, 200)}
    names = sorted(colors)
    features = Features({"img": ImageFeature(), "labels": ClassLabel(names=names)})
    for split, n, seed in (("train", 96, 3), ("test", 36, 4)):
        pairs = testing.color_images(n, seed=seed, colors=colors)
        rows = {"img": [image for image, _ in pairs], "labels": [names.index(label) for _, label in pairs]}
        Dataset.from_dict(rows, features=features).to_parquet(tmp_path / f"{split}.parquet")
    shutil.copytree(base_models["vit"], tmp_path / "vit")
    recipe = testing.image_recipe("local-dir:vit", tmp_path, tmp_path / "run", "feature-extraction",
                                  train={"epochs": 8, "lr": 2e-2})
    recipe["data"] = {"files": {"train": "train.parquet", "test": "test.parquet"}, "columns": {"img": "image", "labels": "label"}}
    result = invoke("run", testing.write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 0, result.output

    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    test = summary["metrics"]["test"]
    assert set(test) == {"loss", "accuracy", "top5_accuracy", "macro_f1"}
    assert test["top5_accuracy"] >= test["accuracy"] and test["accuracy"] > 0.5
    assert summary["data"]["task"]["labels"] == names and summary["data"]["files"]["train"]["format"] == "parquet"
    assert summary["base_model"]["origin"] == "local"


@pytest.mark.parametrize(
    "architecture, kind",
    [("test_vit", "linear"), ("test_maxvit", "linear"), ("test_resnet", "conv"), ("test_byobnet", "conv"),
     ("test_efficientnet", "conv"), ("test_convnext", "conv")],
)
def test_default_adapter_targets_and_head_of_timm_families(architecture, kind):
    """Transformers get their linear projections; CNNs (some with a convolutional `attn` slot, like
    byobnet) their non-depthwise convolutions. The head is never a target."""
    import timm

    from finetune.tasks.image_classification import _adapter_targets, _head_modules

    model = timm.create_model(architecture, pretrained=False, num_classes=3)
    head = _head_modules(model)
    targets = _adapter_targets(model, head)
    modules = dict(model.named_modules())
    assert head == [model.pretrained_cfg["classifier"]] and not set(head) & set(targets)
    assert targets and all(getattr(modules[t], "groups", 1) == 1 for t in targets)
    convs = [t for t in targets if isinstance(modules[t], torch.nn.Conv2d)]
    assert bool(convs) == (kind == "conv")

    model.pretrained_cfg = {**model.pretrained_cfg, "classifier": "no_such_module"}
    assert _head_modules(model) == head  # found through get_classifier() instead


def test_images_are_opened_upright_and_16_bit_greyscale_keeps_its_range(tmp_path):
    import numpy as np

    from finetune.images import open_image

    photo = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = photo.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    photo.save(tmp_path / "phone.jpg", exif=exif)
    assert open_image({"path": str(tmp_path / "phone.jpg"), "bytes": None}).size == (20, 40)

    ramp = (np.arange(256, dtype="uint16") * 257).reshape(16, 16)  # 0 .. 65535
    Image.fromarray(ramp).save(tmp_path / "depth.png")
    pixels = np.asarray(open_image({"path": str(tmp_path / "depth.png"), "bytes": None}))
    assert pixels.shape == (16, 16, 3) and pixels[..., 0].min() == 0 and pixels[..., 0].max() == 255
    assert len(np.unique(pixels)) > 200  # not clipped to white


def test_model_names_become_what_timm_create_model_reads(tmp_path):
    from finetune.errors import FinetuneError
    from finetune.tasks.image_classification import timm_name

    assert timm_name("resnet50.a1_in1k") == "resnet50.a1_in1k"
    assert timm_name("timm/vit_small_patch16_224.augreg_in21k") == "hf-hub:timm/vit_small_patch16_224.augreg_in21k"
    assert timm_name("hf-hub:timm/resnet18.a1_in1k", "main") == "hf-hub:timm/resnet18.a1_in1k@main"
    assert timm_name(str(tmp_path)) == f"local-dir:{tmp_path}"
    with pytest.raises(FinetuneError, match="model.revision: 'v2' applies to Hub repos"):
        timm_name("resnet50.a1_in1k", "v2")


def test_feature_extraction_keeps_every_backbone_weight_and_batchnorm_buffer(finished_run, base_models):
    run_dir = finished_run("cnn", "feature-extraction")
    before = load_file(base_models["cnn"] / "model.safetensors")
    after = load_file(run_dir / "model" / "model.safetensors")
    backbone = [k for k in before if not k.startswith("fc.")]
    assert any(k.endswith("running_var") for k in backbone) and any(k.endswith("num_batches_tracked") for k in backbone)
    changed = [k for k in backbone if not torch.equal(before[k], after[k])]
    assert changed == []
    assert after["fc.weight"].shape == (3, before["fc.weight"].shape[1])  # a new head for the 3 classes


def test_full_fine_tuning_can_give_the_backbone_a_smaller_learning_rate(base_models, colors_dir, tmp_path):
    recipe = testing.image_recipe(base_models["cnn"], colors_dir, tmp_path / "run", "full",
                                  method={"options": {"backbone_lr": 1e-4}}, train={"max_steps": 1})
    from finetune.methods.full import Full, FullOptions
    from finetune.recipe import load_recipe
    from finetune.tasks.image_classification import ImageClassification
    from finetune.training.optim import build_optimizer

    loaded = load_recipe(testing.write_recipe(tmp_path / "r.yaml", recipe))
    task = ImageClassification(loaded.task_options)
    task.labels = LABELS
    method = Full(FullOptions(backbone_lr=1e-4))
    model = method.prepare(task.build_model(str(base_models["cnn"]), None))
    groups = build_optimizer(method.parameter_groups(model), loaded.train).param_groups
    head = {id(p) for p in model.fc.parameters()}
    by_lr: dict[float, set] = {}
    for group in groups:  # each learning rate has a group with weight decay and one without
        by_lr.setdefault(group["lr"], set()).update(id(p) for p in group["params"])
    assert set(by_lr) == {3e-3, 1e-4}
    assert head == by_lr[3e-3] and len(by_lr[1e-4]) == len(list(model.parameters())) - 2


def test_feature_extraction_transfers_what_a_backbone_learnt(tmp_path):
    """A tiny CNN trained on the digits 0-4 gives features that classify 5-9 far better than the
    same architecture with random weights: the pretrained backbone carries the result."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))

    def pairs(classes):
        return [(Image.fromarray((digits.images[i] * 255 / 16).astype("uint8")), f"digit{digits.target[i]}")
                for i in order if digits.target[i] in classes]

    source, target = pairs(range(5)), pairs(range(5, 10))
    testing.write_image_folder(tmp_path / "source", {"train": source[:-150], "test": source[-150:]})
    testing.write_image_folder(tmp_path / "target", {"train": target[:100], "test": target[100:]})
    random_backbone = testing.tiny_timm_model(tmp_path / "random", "test_resnet", num_classes=5)

    def run(name, model, data, method, **train):
        recipe = testing.image_recipe(model, tmp_path / data, tmp_path / name, method, train=train)
        result = invoke("run", testing.write_recipe(tmp_path / f"{name}.yaml", recipe))
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / name / "metrics.json").read_text())["metrics"]["test"]["accuracy"]

    assert run("pretrain", random_backbone, "source", "full", epochs=5) > 0.95
    pretrained = run("transfer", tmp_path / "pretrain" / "model", "target", "feature-extraction", epochs=10, lr=1e-2)
    scratch = run("scratch", random_backbone, "target", "feature-extraction", epochs=10, lr=1e-2)
    assert pretrained > 0.65 and pretrained > scratch + 0.25, (pretrained, scratch)


def test_unreadable_images_are_named_or_skipped_and_counted(base_models, colors_dir, tmp_path):
    data = shutil.copytree(colors_dir, tmp_path / "data")
    (data / "train" / "red" / "garbage.png").write_bytes(b"not an image at all")
    png = sorted((data / "train" / "blue").iterdir())[0].read_bytes()
    (data / "train" / "blue" / "truncated.png").write_bytes(png[: len(png) // 2])
    recipe = testing.image_recipe(base_models["cnn"], data, tmp_path / "run", "full", train={"max_steps": 2})

    result = invoke("run", testing.write_recipe(tmp_path / "strict.yaml", recipe))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "2 of 62 images in the train split cannot be read" in result.output
    assert "garbage.png (not an image file PIL can read)" in result.output and "truncated.png" in result.output
    assert "task.options.skip_unreadable_images: true" in result.output
    assert not (tmp_path / "run").exists()  # checked before the run directory is touched

    recipe["task"]["options"]["skip_unreadable_images"] = True
    result = invoke("run", testing.write_recipe(tmp_path / "skip.yaml", recipe))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    skipped = summary["data"]["task"]["unreadable_images_skipped"]["train"]
    assert sorted(Path(p).name for p in skipped) == ["garbage.png", "truncated.png"]
    assert summary["split_sizes"]["train"] + summary["split_sizes"]["eval"] == 60
    card = (tmp_path / "run" / "README.md").read_text()
    assert "2 unreadable images were skipped (train: 2)" in card


def test_a_folder_with_one_class_is_a_clear_error(base_models, tmp_path):
    only_red = [(image, label) for image, label in testing.color_images(12) if label == "red"]
    data = testing.write_image_folder(tmp_path / "data", {"train": only_red})
    recipe = testing.image_recipe(base_models["cnn"], data, tmp_path / "run", "full")
    result = invoke("run", testing.write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "The train split has no 'label' column" in result.output
    assert "one per class" in result.output and "at least two" in result.output


def test_an_unknown_augmentation_policy_is_a_clear_error(base_models, colors_dir, tmp_path):
    recipe = testing.image_recipe(base_models["cnn"], colors_dir, tmp_path / "run", "full",
                                  task={"options": {"augmentation": {"auto_augment": "bogus"}}})
    result = invoke("run", testing.write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "task.options.augmentation: timm cannot build this augmentation" in result.output
    assert not (tmp_path / "run").exists()


def test_a_column_without_images_is_a_clear_error(base_models, tmp_path):
    rows = [{"image": f"{i}.png", "label": "red" if i % 2 else "blue"} for i in range(20)]
    testing.write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = testing.image_recipe(base_models["cnn"], tmp_path, tmp_path / "run", "full")
    recipe["data"] = {"files": {"train": str(tmp_path / "train.jsonl")}}
    result = invoke("run", testing.write_recipe(tmp_path / "r.yaml", recipe))
    assert result.exit_code == 1 and "The 'image' column of the train split holds Value('string')" in result.output


def test_card_for_the_hub_loads_the_repo(finished_run):
    from finetune.api import Artifact
    from finetune.card import render_card
    from finetune.rundir import read_run

    run = read_run(finished_run("vit", "lora"))
    card = render_card(run, [Artifact("user/tiny-vit", adapter=False), Artifact("user/tiny-vit", adapter=True, subfolder="adapter")])
    assert 'timm.create_model("hf-hub:user/tiny-vit", pretrained=True)' in card
    assert 'PeftModel.from_pretrained(base, "user/tiny-vit", subfolder="adapter")' in card
    assert "- lora" in card and "- peft" in card


def timm_test_images(colors_dir: Path) -> list[Image.Image]:
    from datasets import load_dataset

    return [image.convert("RGB") for image in load_dataset(str(colors_dir), split="test")["image"]]


def predict(model, transform_model, colors_dir: Path) -> list[int]:
    from timm.data import create_transform, resolve_model_data_config

    transform = create_transform(**resolve_model_data_config(transform_model), is_training=False)
    batch = torch.stack([transform(image) for image in timm_test_images(colors_dir)])
    with torch.no_grad():
        return model.eval()(batch).argmax(-1).tolist()


def predict_with_timm(model_dir: Path, colors_dir: Path) -> list[int]:
    import timm

    model = timm.create_model(f"local-dir:{model_dir}", pretrained=True)
    assert model.pretrained_cfg["label_names"] == LABELS
    return predict(model, model, colors_dir)


def predict_with_peft(adapter_dir: Path, colors_dir: Path) -> list[int]:
    import timm
    from peft import PeftConfig, PeftModel

    base_name = PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    assert base_name.startswith("local-dir:")
    base = timm.create_model(base_name, pretrained=True, num_classes=len(LABELS))
    return predict(PeftModel.from_pretrained(base, adapter_dir), base, colors_dir)


@pytest.mark.parametrize("kind, method", [("cnn", "lora"), ("vit", "full")])
def test_predict_on_the_test_folder_gives_the_runs_own_predictions(finished_run, colors_dir, kind, method, tmp_path):
    from finetune.predict import run_examples, task_of
    from finetune.rundir import read_run

    run = finished_run(kind, method)
    out = tmp_path / "predictions.jsonl"
    result = invoke("predict", run, colors_dir / "test", "-o", out)  # a folder: every image in it
    assert result.exit_code == 0, result.output
    predicted = {r["input"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(predicted) == 30

    finished = read_run(run)
    split, rows, expected = run_examples(finished, task_of(finished))  # the test split in the run's own order
    assert split == "test" and len(rows) == 30
    assert [predicted[row["image"]["path"]]["prediction"] for row in rows] == expected
    assert all(r["label"] == LABELS[r["prediction"]] for r in predicted.values())


def test_predict_names_an_unreadable_image_or_skips_it(finished_run, tmp_path):
    run = finished_run("vit", "full")
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.new("RGB", (24, 24), (200, 40, 40)).save(good)
    bad.write_bytes(good.read_bytes()[:40])  # cut short
    stopped = invoke("predict", run, good, bad)
    assert stopped.exit_code == 1
    assert "argument 2: the image cannot be read (" in stopped.output
    skipped = invoke("predict", run, good, bad, "--skip-bad")
    assert skipped.exit_code == 0, skipped.output
    assert [json.loads(line)["input"] for line in skipped.stdout.splitlines() if line.startswith("{")] == [str(good)]
