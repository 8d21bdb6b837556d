"""`finetune export`: a LoRA run's merged model written after the fact exactly as output.merged writes it, the
ONNX export of the classifiers checked against PyTorch with onnxruntime, and the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from finetune import testing
from finetune.cli import main
from finetune.errors import FinetuneError


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def unmerged_copy(run: Path, copy: Path) -> Path:
    """A copy of a finished LoRA run as a run without output.merged leaves it."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "model-merged")
    return copy


def test_merged_export_is_what_the_run_writes_and_loads_without_peft(lora_run, sentiment_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.hub import PushTarget, prepare_push

    run = unmerged_copy(lora_run, tmp_path / "run")
    with pytest.raises(FinetuneError, match=rf"finetune export {run} --merged"):
        prepare_push(run, PushTarget("test-user/tiny", artifacts="merged"))

    result = invoke("export", run, "--merged")
    assert result.exit_code == 0, result.output
    assert f"merged: {run / 'model-merged'}" in result.output
    # The very weights the run's own merge wrote (the same code, on the reloaded adapter).
    exported, written = load_file(run / "model-merged/model.safetensors"), load_file(lora_run / "model-merged/model.safetensors")
    assert exported.keys() == written.keys() and all(torch.equal(exported[k], written[k]) for k in written)
    assert not (run / "model-merged/adapter_config.json").exists()
    assert "model-merged" in (run / "README.md").read_text()  # the card shows how to load it

    # Plain transformers loads it, and it predicts what the adapter on its base predicts.
    texts = [row["text"] for row in map(json.loads, (sentiment_dir / "test.jsonl").read_text().splitlines()[:6])]
    tokenizer = AutoTokenizer.from_pretrained(run / "model-merged")
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    merged = AutoModelForSequenceClassification.from_pretrained(run / "model-merged").eval()
    labels = merged.config.id2label
    base = AutoModelForSequenceClassification.from_pretrained(
        json.loads((run / "metrics.json").read_text())["base_model"]["location"],
        num_labels=len(labels), id2label=labels, label2id={v: k for k, v in labels.items()})
    adapter = PeftModel.from_pretrained(base, run / "model").eval()
    with torch.no_grad():
        difference = (merged(**batch).logits - adapter(**batch).logits).abs().max().item()
    assert difference <= 1e-5, difference

    plan = prepare_push(run, PushTarget("test-user/tiny", artifacts="merged"))
    assert "model.safetensors" in plan.files and "adapter_model.safetensors" not in plan.files

    again = invoke("export", run, "--merged")
    assert again.exit_code == 1 and f"--merged: {run / 'model-merged'} already exists. Add --overwrite" in again.output
    assert invoke("export", run, "--merged", "--overwrite").exit_code == 0


def test_onnx_export_of_a_lora_text_classifier_matches_pytorch(lora_run, sentiment_dir, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")  # the `export` extra
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    run = unmerged_copy(lora_run, tmp_path / "run")
    result = invoke("export", run, "--onnx")
    assert result.exit_code == 0, result.output
    assert f"onnx:   {run / 'onnx/model.onnx'}" in result.output
    assert not (run / "model-merged").exists()  # the merge stayed in memory

    # The run's test texts, a batch of another size and length than the export's.
    texts = [row["text"] for row in map(json.loads, (sentiment_dir / "test.jsonl").read_text().splitlines()[:7])]
    # onnx/ is usable alone: the tokenizer and the config with the run's labels sit beside the graph.
    assert sorted(p.name for p in (run / "onnx").iterdir() if p.suffix == ".safetensors") == []
    assert AutoConfig.from_pretrained(run / "onnx").id2label == {0: "negative", 1: "positive"}
    batch = AutoTokenizer.from_pretrained(run / "onnx").__call__(texts, padding=True, return_tensors="pt")
    session = onnxruntime.InferenceSession(str(run / "onnx/model.onnx"))
    exported = session.run(None, {i.name: batch[i.name].numpy() for i in session.get_inputs()})[0]
    with torch.no_grad():
        expected = AutoModelForSequenceClassification.from_pretrained(lora_run / "model-merged").eval()(**batch).logits
    difference = (torch.from_numpy(exported) - expected).abs().max().item()
    assert difference <= 1e-4, difference


def test_image_classifier_lora_run_exports_merged_and_onnx(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")  # the `export` extra
    import timm
    from peft import PeftModel
    from PIL import Image
    from timm.data import create_transform, resolve_model_data_config

    base = testing.tiny_timm_model(tmp_path / "base", "test_resnet")
    data = testing.write_image_folder(tmp_path / "colors", {"train": testing.color_images(30, seed=1),
                                                           "test": testing.color_images(9, seed=2)})
    recipe = testing.image_recipe(base, data, tmp_path / "run", "lora", train={"epochs": 1})
    assert invoke("run", testing.write_recipe(tmp_path / "lora.yaml", recipe)).exit_code == 0
    result = invoke("export", tmp_path / "run", "--merged", "--onnx")
    assert result.exit_code == 0, result.output

    merged = timm.create_model(f"local-dir:{tmp_path / 'run/model-merged'}", pretrained=True).eval()
    assert merged.pretrained_cfg["label_names"] == ["blue", "green", "red"]
    adapter = PeftModel.from_pretrained(timm.create_model(f"local-dir:{base}", pretrained=True, num_classes=3),
                                        tmp_path / "run/model").eval()
    transform = create_transform(**resolve_model_data_config(merged), is_training=False)
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in sorted((data / "test").rglob("*.png"))])
    session = onnxruntime.InferenceSession(str(tmp_path / "run/onnx/model.onnx"))
    exported = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: pixels.numpy()})[0])
    with torch.no_grad():
        expected = merged(pixels)
        assert (expected - adapter(pixels)).abs().max().item() <= 1e-5
    assert (exported - expected).abs().max().item() <= 1e-4


def test_a_whole_model_method_has_nothing_to_merge_and_missing_onnx_libraries_are_named(lora_run, tmp_path, monkeypatch):
    run = unmerged_copy(lora_run, tmp_path / "run")
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["method"] = {"name": "full"}  # what a full fine-tune's run records
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = invoke("export", run, "--merged")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--merged: the method 'full' saves a whole model; there is no adapter to merge" in result.output
    assert not (run / "model-merged").exists()

    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # as if it were not installed
    result = invoke("export", lora_run, "--onnx")
    assert result.exit_code == 1 and "pip install 'finetune[export]'" in result.output
    assert not (lora_run / "onnx").exists()
    assert invoke("export", run).exit_code == 2  # neither --merged nor --onnx
