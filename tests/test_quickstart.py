"""The offline quickstart really transfers: real pretrained MiniLM weights, LoRA, shipped data."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from finetune.cli import main

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quickstart_reaches_its_promised_accuracy(tmp_path):
    run_dir = tmp_path / "quickstart"
    result = CliRunner().invoke(main, ["run", str(REPO / "recipes" / "quickstart.yaml"), "--set", f"output.dir={run_dir}"])
    assert result.exit_code == 0, result.output
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["split_sizes"] == {"train": 648, "eval": 72, "test": 200}
    assert summary["metrics"]["test"]["accuracy"] >= 0.85
    assert summary["parameters"]["trainable"] < 0.01 * summary["parameters"]["total"]  # LoRA: under 1% trained
    assert (run_dir / "model" / "adapter_model.safetensors").is_file()
