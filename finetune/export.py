"""`finetune export RUN_DIR`: a finished run's model in another form, after the fact, from the run directory alone.

- `--merged` writes `model-merged/`: the adapter folded into its base by the very code that writes it at the end
  of a run with output.merged (`save_merged`), and the card then shows its usage, as that run's does.
- `--onnx` writes `onnx/model.onnx` for a classifier (a LoRA run's merged model), with torch.onnx's exporter
  (`dynamo=True`, the maintained one), and checks onnxruntime's outputs against PyTorch's before keeping it.

The task loads its saved model back (`Task.load_saved`), on the base model the run started from. Each output is
written beside its place and renamed into it once complete; an existing one is kept unless `overwrite`.
"""

from __future__ import annotations

from pathlib import Path

from finetune import plugins
from finetune.errors import FinetuneError
from finetune.files import atomic_path
from finetune.rundir import RunLayout, read_run

ONNX_DIR = "onnx"
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}
ONNX_TOLERANCE = 1e-4
"""The largest difference allowed between onnxruntime's and PyTorch's outputs in float32 (kernels sum in other orders)."""
EXPORT_EXTRA = "pip install 'finetune[export]'"


def save_merged(task, method, model, directory: Path):
    """Fold the adapter of the trained `model` into its base and save the whole model into `directory`; return the
    merged model. Merging changes `model` in place (peft's merge_and_unload): nothing may use it afterwards."""
    merged = method.merge(model)
    with atomic_path(directory) as tmp:
        task.save(merged, tmp, adapter=False)
    return merged


def export(root: Path, *, merged: bool, onnx: bool, overwrite: bool = False) -> list[str]:
    """Write the exports asked for; return one line per output, for the user. Every check runs before anything is written."""
    from finetune.api import BaseTask

    run = read_run(root)
    layout = RunLayout(run.root)
    task = plugins.load(plugins.TASKS, run.recipe.task.name)(run.recipe.task_options)
    method = plugins.load(plugins.METHODS, run.recipe.method.name)(run.recipe.method_options)
    if merged and not method.produces_adapter:
        raise FinetuneError(f"--merged: the method '{run.recipe.method.name}' saves a whole model; there is no adapter "
                            f"to merge. {layout.model} is that model: use it as it is (or export it with --onnx).")
    if onnx and type(task).export_inputs is BaseTask.export_inputs:
        raise FinetuneError(f"--onnx: the task '{run.recipe.task.name}' has no ONNX export (the classifiers have one). "
                            "Export its model with --merged, or use the saved model as it is.")
    if onnx:
        _require_onnx_libraries()
    wanted = {"--merged": merged and layout.merged, "--onnx": onnx and layout.root / ONNX_DIR}
    for flag, target in wanted.items():
        if target and target.exists() and not overwrite:
            raise FinetuneError(f"{flag}: {target} already exists. Add --overwrite to replace it, or use it as it is.")

    model = _load_trained(run, task, method)
    lines = []
    if merged:
        whole = save_merged(task, method, model, layout.merged)
        from finetune.card import write_card

        write_card(layout.root)  # the card now shows how to load the merged copy too
        lines.append(f"merged: {layout.merged}")
    else:
        whole = method.merge(model)  # the same model for a whole-model method
    if onnx:
        path, difference = _export_onnx(task, whole.eval(), layout.root / ONNX_DIR, preprocessing=layout.model)
        lines.append(f"onnx:   {path} (largest difference from PyTorch on the check inputs: {difference:.1e})")
    return lines


def _load_trained(run, task, method):
    """The run's trained model, as its task saved it in model/, in eval mode."""
    from finetune.training.precision import load_dtype

    model = task.load_saved(RunLayout(run.root).model, run, _base_source(run), adapter=method.produces_adapter,
                            dtype=load_dtype(run.recipe.model.dtype))
    return model.eval()


def _base_source(run) -> str:
    """Where the run loaded its base model from (metrics.json records it); a model shipped in a package is found
    again in this environment's copy of the package."""
    from finetune.sources import resolve_model_source

    base = run.summary.get("base_model", {})
    if base.get("origin") == "package" or not base.get("location"):
        return resolve_model_source(run.recipe.model.name, run.root)
    return base["location"]


def _require_onnx_libraries() -> None:
    for module in ("onnx", "onnxscript", "onnxruntime"):  # onnxscript: what torch.onnx's exporter translates with
        try:
            __import__(module)
        except ImportError:
            raise FinetuneError(f"--onnx needs the onnx, onnxscript and onnxruntime packages ({module} is not installed). "
                                f"Install them with: {EXPORT_EXTRA}") from None


def _export_onnx(task, model, folder: Path, preprocessing: Path) -> tuple[Path, float]:
    """Export `model` to `folder`/model.onnx on the task's example inputs, keeping it only when onnxruntime's
    outputs match PyTorch's within ONNX_TOLERANCE; return the path and the largest difference. Beside it go the
    saved model's files that are not weights (tokenizer, preprocessor) and the model's config with its labels,
    so the folder is usable on its own (AutoTokenizer.from_pretrained(folder))."""
    import shutil

    import torch

    inputs = task.export_inputs(model)
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        try:
            torch.onnx.export(model, (), tmp / "model.onnx", kwargs=inputs.tensors, input_names=list(inputs.tensors),
                              output_names=["logits"], dynamic_shapes=inputs.dynamic, dynamo=True, verbose=False)
        except Exception as exc:  # torch.export cannot trace every model (data-dependent control flow)
            raise FinetuneError(f"--onnx: torch.onnx could not export {type(model).__name__} ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:300]}). Nothing was written; use the saved model as it is.") from None
        difference = onnx_difference(tmp / "model.onnx", model, inputs.tensors)
        for file in sorted(preprocessing.iterdir()):
            if file.is_file() and file.suffix not in WEIGHT_SUFFIXES and file.name not in ("adapter_config.json", "README.md"):
                shutil.copy2(file, tmp / file.name)
        if hasattr(getattr(model, "config", None), "save_pretrained"):  # a transformers model: its labels
            model.config.save_pretrained(tmp)
        if not difference <= ONNX_TOLERANCE:
            raise FinetuneError(f"--onnx: the exported model's outputs differ from PyTorch's by up to {difference:.2e} "
                                f"(more than {ONNX_TOLERANCE:g}), so it was not kept. Use the saved model as it is.")
    return folder / "model.onnx", difference


def onnx_difference(path: Path, model, tensors: dict) -> float:
    """The largest absolute difference between onnxruntime's first output and the PyTorch `model`'s on `tensors`."""
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = session.run(None, {name: tensor.numpy() for name, tensor in tensors.items()})[0]
    with torch.no_grad():
        output = model(**tensors)
    expected = output if isinstance(output, torch.Tensor) else output[0]  # a transformers ModelOutput: its logits
    return float(abs(torch.from_numpy(exported) - expected.float()).max())
