"""LoRA's family options: DoRA and rsLoRA train, save and reload in peft predicting what the run predicted;
the initialisations are peft's; quantize says what it needs instead of training unquantized."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from finetune import testing
from finetune.cli import main
from finetune.errors import FinetuneError, RecipeError
from finetune.recipe import load_recipe

LABELS = ["negative", "positive"]


def reload_and_predict(adapter_dir: Path, base_dir: Path, texts: list[str]) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=2, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    with torch.no_grad():
        logits = model(**tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")).logits
    return logits.argmax(-1).tolist()


@pytest.mark.parametrize("option", ["use_dora", "use_rslora"])
def test_dora_and_rslora_train_save_and_reload_in_peft_predicting_the_runs_predictions(
        option, tmp_path, pretrained_distilbert, sentiment_dir):
    run_dir = tmp_path / "run"
    recipe = testing.text_recipe(pretrained_distilbert, sentiment_dir, run_dir, "lora",
                                 method={"options": {option: True, "r": 4}}, train={"epochs": 2})
    path = testing.write_recipe(tmp_path / "lora.yaml", recipe)
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 0, result.output
    config = json.loads((run_dir / "model" / "adapter_config.json").read_text())
    assert config[option] is True  # peft trained and saved the variant, not plain LoRA
    if option == "use_dora":  # DoRA's magnitude vectors are trained and saved with the adapter
        from safetensors.torch import load_file

        assert any("lora_magnitude_vector" in k for k in load_file(run_dir / "model" / "adapter_model.safetensors"))
    texts = [json.loads(line)["text"] for line in (sentiment_dir / "test.jsonl").read_text().splitlines()]
    expected = json.loads((run_dir / "predictions.json").read_text())["test"]["predictions"]
    assert reload_and_predict(run_dir / "model", pretrained_distilbert, texts) == expected
    assert f"lora.{option}" in (run_dir / "README.md").read_text()  # the card's hyperparameters name the variant


def test_the_initialisations_offered_are_peft_ones():
    from peft import LoraConfig

    from finetune.methods.lora import INITIALISATIONS

    accepted = {value for arg in typing.get_args(typing.get_type_hints(LoraConfig)["init_lora_weights"])
                for value in (typing.get_args(arg) or (arg,))}
    assert {value for value in INITIALISATIONS if isinstance(value, str)} <= accepted
    assert {True, False} <= set(INITIALISATIONS)


def lora_recipe(tmp_path, distilbert_dir, sentiment_dir, **options) -> Path:
    recipe = testing.text_recipe(distilbert_dir, sentiment_dir, tmp_path / "run", "lora", method={"options": options})
    return testing.write_recipe(tmp_path / "r.yaml", recipe)


def test_an_initialisation_that_rewrites_the_base_is_refused_with_the_reason(tmp_path, distilbert_dir, sentiment_dir):
    with pytest.raises(RecipeError, match=r"method\.options\.init_lora_weights.*'pissa' rewrites the base weights"):
        load_recipe(lora_recipe(tmp_path, distilbert_dir, sentiment_dir, init_lora_weights="pissa"))
    with pytest.raises(RecipeError, match="not one of peft's initialisations"):
        load_recipe(lora_recipe(tmp_path, distilbert_dir, sentiment_dir, init_lora_weights="uniform"))
    load_recipe(lora_recipe(tmp_path, distilbert_dir, sentiment_dir, init_lora_weights="gaussian"))


def test_quantize_without_bitsandbytes_and_cuda_is_one_clear_error(tmp_path, distilbert_dir, sentiment_dir):
    path = lora_recipe(tmp_path, distilbert_dir, sentiment_dir, quantize="4bit")
    with pytest.raises(RecipeError) as caught:  # finetune validate / run, before anything loads
        load_recipe(path)
    assert "method.options.quantize needs a CUDA GPU and pip install bitsandbytes" in str(caught.value)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 1 and "Traceback" not in result.output and "bitsandbytes" in result.output
    # A QLoRA run's recipe copy is still read back here (its adapter predicts on a CPU machine).
    assert load_recipe(path, cross_check=False).method_options.quantize == "4bit"


def test_quantize_at_run_time_on_cpu_refuses_rather_than_training_unquantized(distilbert_dir):
    from finetune.methods.lora import Lora, LoraOptions
    from finetune.tasks.text_classification import TextClassification, TextClassificationOptions

    task = TextClassification(TextClassificationOptions())
    task.labels = LABELS
    options = LoraOptions.model_construct(**{**LoraOptions().model_dump(), "quantize": "8bit"})  # as if validated elsewhere
    with pytest.raises(FinetuneError, match="method.options.quantize needs a CUDA GPU and pip install bitsandbytes"):
        Lora(options).prepare(task.build_model(str(distilbert_dir), None))
