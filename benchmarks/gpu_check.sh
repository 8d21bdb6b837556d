#!/usr/bin/env bash
# The GPU check of the scale work (benchmarks/gpu_check.py): bf16/fp16 text LoRA and full, a tiny
# SD LoRA, FSDP (1 process), ZeRO-2 when deepspeed is installed; peak GPU memory and step time each.
# Run from the repository root, in an environment where finetune is installed; at most 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec timeout 480 "$PYTHON" -m benchmarks.gpu_check "$@"
