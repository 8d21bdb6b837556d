"""Shared fixtures: tiny models and data written per session, an offline, quiet environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from finetune import testing

os.environ.update(testing.OFFLINE_ENV)  # finetune.testing imports no Hugging Face library


@pytest.fixture(scope="session", autouse=True)
def _datasets_cache(tmp_path_factory):
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("datasets-cache"))


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Every test may train at its own precision: accelerate fixes it once per process, `finetune run` once per run."""
    yield
    testing.fresh_accelerate_state()


@pytest.fixture(scope="session")
def distilbert_dir(tmp_path_factory) -> Path:
    return testing.tiny_text_model(tmp_path_factory.mktemp("tiny-distilbert"), "distilbert")


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    return testing.tiny_text_model(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def sentiment_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("sentiment")
    testing.write_jsonl(directory / "train.jsonl", testing.sentiment_examples(160, seed=1))
    testing.write_jsonl(directory / "test.jsonl", testing.sentiment_examples(40, seed=2))
    return directory


@pytest.fixture(scope="session")
def pretrained_distilbert(tmp_path_factory, distilbert_dir, sentiment_dir) -> Path:
    """A tiny backbone that has learnt something: fully fine-tuned on the sentiment data, head
    dropped. Feature extraction and LoRA on a random backbone would have nothing to transfer."""
    from click.testing import CliRunner
    from transformers import AutoModel, AutoTokenizer

    from finetune.cli import main

    work = tmp_path_factory.mktemp("pretraining")
    recipe = testing.text_recipe(distilbert_dir, sentiment_dir, work / "run", "full", train={"epochs": 8})
    result = CliRunner().invoke(main, ["run", str(testing.write_recipe(work / "full.yaml", recipe))])
    assert result.exit_code == 0, result.output
    backbone = work / "backbone"
    AutoModel.from_pretrained(work / "run" / "model").save_pretrained(backbone)
    AutoTokenizer.from_pretrained(work / "run" / "model").save_pretrained(backbone)
    return backbone


@pytest.fixture
def recipe_file(tmp_path, pretrained_distilbert, sentiment_dir):
    """Write a tiny text-classification recipe; returns (recipe path, run dir)."""

    def make(method: str = "full", **sections) -> tuple[Path, Path]:
        run_dir = tmp_path / f"run-{method}"
        recipe = testing.text_recipe(pretrained_distilbert, sentiment_dir, run_dir, method, **sections)
        return testing.write_recipe(tmp_path / f"{method}.yaml", recipe), run_dir

    return make


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, pretrained_distilbert, sentiment_dir) -> Path:
    """A finished LoRA text-classification run with a merged copy, trained once per session (push, export)."""
    from click.testing import CliRunner

    from finetune.cli import main

    work = tmp_path_factory.mktemp("lora-run")
    recipe = testing.text_recipe(pretrained_distilbert, sentiment_dir, work / "run", "lora",
                                 train={"epochs": 2}, output={"merged": True}, card={"license": "apache-2.0"})
    result = CliRunner().invoke(main, ["run", str(testing.write_recipe(work / "lora.yaml", recipe))])
    assert result.exit_code == 0, result.output
    return work / "run"
