"""The GPU check: every precision, method and engine of the scale work, run once each on one GPU,
with peak GPU memory and step time per variant (from each run's metrics.json). Offline.

    bash benchmarks/gpu_check.sh        # at most 8 minutes on one GPU

Text runs train LoRA and full fine-tuning of the shipped all-MiniLM-L6-v2 on the shipped sentiment
data; the Stable Diffusion run is a tiny pipeline built from configs (finetune.testing). FSDP runs as
one process through recipes/accelerate/fsdp-full-shard.yaml; ZeRO-2 runs when deepspeed imports.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
CONFIGS = ROOT / "recipes" / "accelerate"
STEPS = 40
BUDGET_S = 450  # gpu_check.sh kills the whole check at 480 s


def text_recipe(run_dir: Path, method: str, precision: str, dtype: str = "float32", checkpointing: bool = False) -> dict:
    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe["data"]["files"] = {k: str(QUICKSTART.parent / v) for k, v in recipe["data"]["files"].items()}
    if method != "lora":
        recipe["method"] = {"name": method}  # the quickstart's options are LoRA's
    recipe["model"]["dtype"] = dtype
    recipe["train"].update(max_steps=STEPS, mixed_precision=precision, log_every_steps=10, gradient_checkpointing=checkpointing,
                           lr=1e-4 if method == "full" else 1e-3)
    recipe["eval"] = {"every_steps": STEPS}
    recipe["checkpoint"] = {"every_steps": STEPS}
    recipe["output"] = {"dir": str(run_dir)}
    return recipe


def sd_recipe(run_dir: Path, work: Path) -> dict:
    from finetune import testing

    model = testing.tiny_stable_diffusion(work / "tiny-sd")
    data = testing.write_captioned_folder(work / "captions", testing.captioned_images(32, size=32))
    recipe = testing.text_to_image_recipe(model, data, run_dir, "lora", train={
        "max_steps": STEPS, "batch_size": 4, "mixed_precision": "bf16", "gradient_checkpointing": True})
    recipe["task"]["options"]["validation_prompts"] = ["a red square"]
    return recipe


def variants(work: Path) -> list[tuple[str, dict, list[str]]]:
    ddp: list[str] = []  # one process, no launcher
    found = [
        ("text LoRA bf16 (bf16 weights)", text_recipe(work / "lora-bf16", "lora", "bf16", "bfloat16"), ddp),
        ("text LoRA fp16", text_recipe(work / "lora-fp16", "lora", "fp16"), ddp),
        ("text full bf16", text_recipe(work / "full-bf16", "full", "bf16"), ddp),
        ("text full fp16", text_recipe(work / "full-fp16", "full", "fp16"), ddp),
        ("text full bf16 + gradient checkpointing", text_recipe(work / "full-gc", "full", "bf16", checkpointing=True), ddp),
        ("tiny SD LoRA bf16 + gradient checkpointing", sd_recipe(work / "sd-lora", work), ddp),
        ("text LoRA with --cpu (no GPU memory)", text_recipe(work / "lora-cpu", "lora", "bf16"), ["--cpu"]),
        ("FSDP2 full, 1 process", text_recipe(work / "fsdp-full", "full", "bf16"),
         ["--accelerate-config", str(CONFIGS / "fsdp-full-shard.yaml"), "--processes", "1"]),
        ("FSDP2 LoRA, 1 process", text_recipe(work / "fsdp-lora", "lora", "bf16"),
         ["--accelerate-config", str(CONFIGS / "fsdp-full-shard.yaml"), "--processes", "1"]),
    ]
    if importlib.util.find_spec("bitsandbytes"):  # QLoRA: method.options.quantize
        for bits in ("4bit", "8bit"):
            qlora = text_recipe(work / f"qlora-{bits}", "lora", "bf16")
            qlora["method"].setdefault("options", {})["quantize"] = bits
            found.append((f"text QLoRA {bits} bf16", qlora, ddp))
    else:
        print("bitsandbytes is not installed: the QLoRA variants are skipped (pip install bitsandbytes)")
    if importlib.util.find_spec("deepspeed"):
        found.append(("DeepSpeed ZeRO-2 full, 1 process", text_recipe(work / "zero2", "full", "bf16"),
                      ["--accelerate-config", str(CONFIGS / "deepspeed-zero2.yaml"), "--processes", "1"]))
    else:
        print("deepspeed is not installed: the ZeRO-2 variant is skipped (pip install deepspeed)")
    return found


def run(name: str, recipe: dict, launch: list[str], work: Path, timeout: float) -> dict:
    path = work / f"{abs(hash(name))}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "finetune", "run", str(path), "--overwrite", *launch],
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "FAILED", "wall_s": time.perf_counter() - started, "error": [f"timed out after {timeout:.0f} s"]}
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"status": "FAILED", "wall_s": wall, "error": done.stderr.strip().splitlines()[-1:] or ["?"]}
    summary = json.loads((Path(recipe["output"]["dir"]) / "metrics.json").read_text())
    return {"status": "ok", "wall_s": wall, "steps": summary["steps"], "step_ms": 1000 * summary["train_seconds"] / max(summary["steps"], 1),
            "gpu_mb": summary["peak_memory_mb"].get("gpu"), "eval_loss": summary["metrics"]["eval"]["loss"]}


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU here: the GPU check needs one")
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    failed = 0
    print("| variant | status | steps | step ms | peak GPU MB | eval loss | wall s |\n|---|---|---|---|---|---|---|")
    deadline = time.perf_counter() + BUDGET_S
    with tempfile.TemporaryDirectory() as tmp:
        for name, recipe, launch in variants(Path(tmp)):
            left = deadline - time.perf_counter()
            if left < 20:
                failed += 1
                print(f"| {name} | not run: the 8-minute budget is spent | | | | | |", flush=True)
                continue
            row = run(name, recipe, launch, Path(tmp), timeout=min(left, 120))
            if row["status"] != "ok":
                failed += 1
                print(f"| {name} | FAILED: {row['error'][0][:150]} | | | | | {row['wall_s']:.0f} |", flush=True)
                continue
            print(f"| {name} | ok | {row['steps']} | {row['step_ms']:.1f} | {row['gpu_mb']} | {row['eval_loss']:.4f} | "
                  f"{row['wall_s']:.0f} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
