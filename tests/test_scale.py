"""Past one GPU: slim checkpoints, low-memory loading, gradient checkpointing, accelerate configs,
multi-node launch, process-group timeouts. Every check runs on the CPU, offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from finetune import testing
from finetune.cli import main

FIXED_SIZE = {"random_states_0.pkl", "scheduler.bin", "trainer_state.json", "base_fingerprint.json"}
"""Checkpoint files whose size does not grow with the model's."""


def invoke(*args):
    testing.fresh_accelerate_state()
    return CliRunner().invoke(main, [str(a) for a in args])


def run_ok(path: Path, recipe: dict, *args) -> Path:
    result = invoke("run", testing.write_recipe(path, recipe), *args)
    assert result.exit_code == 0, result.output
    return Path(recipe["output"]["dir"])


def checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step-*"))


rewind = testing.rewind_run


def same_files(a: Path, b: Path, pattern: str = "*.safetensors") -> None:
    files = sorted(p.relative_to(a) for p in a.rglob(pattern))
    assert files, f"no {pattern} in {a}"
    for relative in files:
        x, y = load_file(a / relative), load_file(b / relative)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), relative


def model_bytes(run_dir: Path, what: str) -> int:
    return sum(p.stat().st_size for p in (run_dir / what).rglob("*.safetensors"))


# -- checkpoints that hold what training changes ----------------------------------------------
@pytest.fixture
def own_model(tmp_path) -> Path:
    """A model folder of the test's own, which a test may overwrite."""
    return testing.tiny_text_model(tmp_path / "base", "distilbert", dropout=0.0)


@pytest.mark.parametrize("method", ["lora", "feature-extraction", "full"])
def test_checkpoints_hold_only_what_trains_and_resume_bit_identically(method, tmp_path, own_model, sentiment_dir):
    recipe = testing.text_recipe(own_model, sentiment_dir, tmp_path / "whole", method,
                                 train={"epochs": 2, "log_every_steps": 1}, checkpoint={"every_steps": 7, "keep_last": 5})
    whole = run_ok(tmp_path / "whole.yaml", recipe)
    first = checkpoints(whole)[0]
    parameters = json.loads((whole / "metrics.json").read_text())["parameters"]
    trained_bytes = 4 * parameters["trainable"]  # float32
    saved = {f.name: f.stat().st_size for f in first.iterdir()}
    scaling = sum(size for name, size in saved.items() if name not in FIXED_SIZE)
    # The trained weights and their two AdamW moments, and little else (file headers).
    assert 3 * trained_bytes <= scaling <= 1.5 * 3 * trained_bytes
    if method != "full":  # the frozen base is not in it
        assert saved["model.safetensors"] < 0.5 * 4 * parameters["total"]

    resumed = rewind(whole, tmp_path / "resumed")
    run_ok(tmp_path / "resumed.yaml", {**recipe, "output": {"dir": str(resumed)}}, "--resume")
    same_files(whole / "model", resumed / "model")
    assert json.loads((whole / "metrics.json").read_text())["metrics"] == json.loads((resumed / "metrics.json").read_text())["metrics"]


def test_a_checkpoint_of_another_base_is_refused(tmp_path, own_model, sentiment_dir):
    recipe = testing.text_recipe(own_model, sentiment_dir, tmp_path / "run", "lora", train={"epochs": 1},
                                 checkpoint={"every_steps": 4})
    run_dir = run_ok(tmp_path / "run.yaml", recipe)
    rewind(run_dir, tmp_path / "again")
    shutil.rmtree(own_model)
    testing.tiny_text_model(own_model, "distilbert", seed=1, dropout=0.0)  # same name, same shapes, other weights
    result = invoke("run", testing.write_recipe(tmp_path / "again.yaml", {**recipe, "output": {"dir": str(tmp_path / "again")}}),
                    "--resume")
    assert result.exit_code == 1
    assert "was trained on another base model" in result.output and "frozen weights differ" in result.output
    assert "model.revision" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "again" / "model").exists()


def test_text_to_image_lora_checkpoints_are_adapter_sized_and_resume_bit_identically(tmp_path):
    sd = testing.tiny_stable_diffusion(tmp_path / "sd")
    data = testing.write_captioned_folder(tmp_path / "captions", testing.captioned_images(12, size=24))
    recipe = testing.text_to_image_recipe(sd, data, tmp_path / "whole", "lora", train={"max_steps": 6, "batch_size": 2},
                                          checkpoint={"every_steps": 3})
    recipe["task"]["options"]["validation_prompts"] = []
    whole = run_ok(tmp_path / "whole.yaml", recipe)
    first = checkpoints(whole)[0]
    adapter = model_bytes(whole, "model")
    pipeline_weights = sum(p.stat().st_size for p in sd.rglob("*.safetensors"))
    assert (first / "model.safetensors").stat().st_size < 2 * adapter < pipeline_weights / 4

    resumed = rewind(whole, tmp_path / "resumed")
    run_ok(tmp_path / "resumed.yaml", {**recipe, "output": {"dir": str(resumed)}}, "--resume")
    same_files(whole / "model", resumed / "model")


# -- low memory on one device -----------------------------------------------------------------
def test_bfloat16_weights_load_frozen_in_bf16_and_train_in_float32(tmp_path, own_model, sentiment_dir):
    recipe = testing.text_recipe(own_model, sentiment_dir, tmp_path / "run", "lora", model={"dtype": "bfloat16"},
                                 train={"epochs": 2, "mixed_precision": "bf16"})
    run_dir = run_ok(tmp_path / "run.yaml", recipe)
    summary = json.loads((run_dir / "metrics.json").read_text())
    dtypes = summary["parameters"]["dtypes"]
    assert dtypes["frozen"] == {"bfloat16": summary["parameters"]["total"] - summary["parameters"]["trainable"]}
    assert dtypes["trainable"] == {"float32": summary["parameters"]["trainable"]}
    assert 100 < summary["peak_memory_mb"]["host"] < 50_000  # MB, not kB
    adapter = load_file(run_dir / "model" / "adapter_model.safetensors")
    assert {v.dtype for v in adapter.values()} == {torch.float32}
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at zero
    # Under bf16 autocast the matrix products run in bf16 either way: float32 weights give nearly the same run.
    fp32 = run_ok(tmp_path / "fp32.yaml", {**recipe, "model": {"name": str(own_model)}, "output": {"dir": str(tmp_path / "fp32")}})
    reference = json.loads((fp32 / "metrics.json").read_text())["metrics"]
    assert summary["metrics"]["eval"]["loss"] == pytest.approx(reference["eval"]["loss"], abs=0.01)

    without_autocast = {**recipe, "train": {**recipe["train"], "mixed_precision": "no"}, "output": {"dir": str(tmp_path / "no")}}
    result = invoke("run", testing.write_recipe(tmp_path / "no.yaml", without_autocast))
    assert result.exit_code == 1 and "train.mixed_precision: bf16" in result.output and "Traceback" not in result.output


def step_records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "logs" / "steps.jsonl").read_text().splitlines()) if "loss" in r]


def text_lora(tmp_path, model, data):
    return testing.text_recipe(model, data, tmp_path, "lora", train={"max_steps": 4, "log_every_steps": 1})


def image_full(tmp_path, model, data):  # a ViT: layer norm (batch norm that trains is refused, see below)
    return testing.image_recipe(model, data, tmp_path, "full", train={"max_steps": 4, "log_every_steps": 1, "batch_size": 4})


def sd_lora(tmp_path, model, data):
    recipe = testing.text_to_image_recipe(model, data, tmp_path, "lora", train={"max_steps": 3, "log_every_steps": 1,
                                                                                "batch_size": 2})
    recipe["task"]["options"]["validation_prompts"] = []
    return recipe


def color_folder(tmp_path: Path) -> Path:
    return testing.write_image_folder(tmp_path / "images", {"train": testing.color_images(30), "test": testing.color_images(6, seed=1)})


@pytest.mark.parametrize("kind", ["text-lora", "image-full", "text-to-image-lora"])
def test_gradient_checkpointing_gives_the_same_losses_gradients_and_weights(kind, tmp_path, own_model, sentiment_dir):
    if kind == "text-lora":
        recipe, model_file = text_lora(tmp_path / "plain", own_model, sentiment_dir), "adapter_model.safetensors"
    elif kind == "image-full":
        model = testing.tiny_timm_model(tmp_path / "vit", "test_vit", num_classes=3)
        recipe, model_file = image_full(tmp_path / "plain", model, color_folder(tmp_path)), "model.safetensors"
    else:
        model = testing.tiny_stable_diffusion(tmp_path / "sd")
        data = testing.write_captioned_folder(tmp_path / "captions", testing.captioned_images(8, size=24))
        recipe, model_file = sd_lora(tmp_path / "plain", model, data), "pytorch_lora_weights.safetensors"
    plain = run_ok(tmp_path / "plain.yaml", recipe)
    checkpointed = run_ok(tmp_path / "checkpointed.yaml", {**recipe, "train": {**recipe["train"], "gradient_checkpointing": True},
                                                            "output": {"dir": str(tmp_path / "checkpointed")}})
    a, b = step_records(plain), step_records(checkpointed)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    wa, wb = load_file(plain / "model" / model_file), load_file(checkpointed / "model" / model_file)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_gradient_checkpointing_over_training_batch_norm_is_refused(tmp_path):
    # Recomputing a batch-norm layer in training mode would update its running statistics twice per step.
    recipe = image_full(tmp_path / "run", testing.tiny_timm_model(tmp_path / "resnet", num_classes=3), color_folder(tmp_path))
    recipe["train"]["gradient_checkpointing"] = True
    result = invoke("run", testing.write_recipe(tmp_path / "run.yaml", recipe))
    assert result.exit_code == 1 and "batch-norm layers train" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


# -- accelerate configs, several processes, several machines -----------------------------------
ACCELERATE_CONFIGS = sorted((Path(__file__).parents[1] / "recipes" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_accelerate_config_is_read_by_accelerate(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert loaded.distributed_type in {"MULTI_GPU", "FSDP", "DEEPSPEED"}
    if loaded.distributed_type == "DEEPSPEED":
        assert loaded.deepspeed_config["gradient_accumulation_steps"] == 1  # finetune accumulates itself
        assert loaded.deepspeed_config["zero_stage"] < 3 or loaded.deepspeed_config["zero3_save_16bit_model"]


def test_an_accelerate_config_with_a_typo_is_named(tmp_path, own_model, sentiment_dir):
    config = tmp_path / "bad.yaml"
    config.write_text(ACCELERATE_CONFIGS[0].read_text() + "num_procesess: 2\n")
    recipe = testing.write_recipe(tmp_path / "r.yaml", testing.text_recipe(own_model, sentiment_dir, tmp_path / "run"))
    result = invoke("run", recipe, "--accelerate-config", config)
    assert result.exit_code == 1 and f"--accelerate-config: accelerate cannot read {config}" in result.output
    assert "num_procesess" in result.output and not (tmp_path / "run").exists()


def launch(*args, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=timeout)


def ddp_recipe(tmp_path: Path, model: Path, data: Path, name: str, **train) -> Path:
    recipe = testing.text_recipe(model, data, tmp_path / name, "lora", train={"epochs": 1, "batch_size": 4, **train})
    return testing.write_recipe(tmp_path / f"{name}.yaml", recipe)


@pytest.fixture
def small_data(tmp_path) -> Path:
    testing.write_jsonl(tmp_path / "data" / "train.jsonl", testing.sentiment_examples(32, seed=1))
    testing.write_jsonl(tmp_path / "data" / "test.jsonl", testing.sentiment_examples(8, seed=2))
    return tmp_path / "data"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(*node_args: list) -> list[subprocess.CompletedProcess]:
    """Two `finetune run` launchers on this machine as nodes 0 and 1, meeting over loopback."""
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "finetune", "run", *map(str, args), "--nnodes", "2", "--node-rank",
                               str(rank), "--rdzv-endpoint", endpoint], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for rank, args in enumerate(node_args)]
    return [subprocess.CompletedProcess(n.args, n.wait(timeout=600), *n.communicate()) for n in nodes]


@pytest.mark.slow
def test_two_processes_by_torchrun_by_the_ddp_config_and_as_two_machines_train_the_same(tmp_path, own_model, small_data):
    # In-process (`main([...])`, as a notebook would): the launched processes get this command line, not sys.argv.
    by_torchrun = invoke("run", ddp_recipe(tmp_path, own_model, small_data, "torchrun"), "--processes", 2)
    assert by_torchrun.exit_code == 0, by_torchrun.output
    by_config = launch("run", ddp_recipe(tmp_path, own_model, small_data, "config"), "--accelerate-config",
                       Path(__file__).parents[1] / "recipes" / "accelerate" / "ddp-cpu.yaml")
    assert by_config.returncode == 0, by_config.stderr[-3000:]
    recipe = ddp_recipe(tmp_path, own_model, small_data, "nodes")
    for node in two_nodes([recipe], [recipe]):  # --nnodes 2 --processes 1, over loopback
        assert node.returncode == 0, node.stderr[-3000:]
    for name in ("config", "nodes"):
        summary = json.loads((tmp_path / name / "metrics.json").read_text())
        assert len(summary["rank_checksums"]) == 2 and summary["rank_checksums"][0] == summary["rank_checksums"][1]
        same_files(tmp_path / "torchrun" / "model", tmp_path / name / "model")
    # One set of outputs from the two machines, no probe or temporary file left behind.
    assert len(checkpoints(tmp_path / "nodes")) == 1 and not list((tmp_path / "nodes").glob(".*"))


@pytest.mark.slow
def test_machines_that_do_not_share_the_run_directory_are_refused(tmp_path, own_model, small_data):
    recipe = ddp_recipe(tmp_path, own_model, small_data, "run")
    nodes = two_nodes([recipe], [recipe, "--set", f"output.dir={tmp_path / 'elsewhere'}"])  # node 1 looks elsewhere
    assert all(node.returncode != 0 for node in nodes)
    assert "is not shared by every machine" in nodes[0].stderr and "processes [1]" in nodes[0].stderr
    assert not checkpoints(tmp_path / "run")


# -- long work on one process, and the process-group timeout ------------------------------------
SLOW_TASK = '''
import os, time
from finetune.tasks.text_classification import TextClassification


def nap(where):
    if os.environ.get("NAP_WHERE") == where and os.environ.get("RANK", "0") == "0":
        time.sleep(float(os.environ["NAP_SECONDS"]))


class SlowText(TextClassification):
    def prepare_data(self, splits):
        nap("prepare_data")  # inside local_main_process_first: the other process waits at a barrier
        return super().prepare_data(splits)

    def data_facts(self):
        nap("outputs")  # on the main process after the last collective, with the other outputs
        return super().data_facts()
'''


@pytest.fixture
def slow_task_site(tmp_path) -> Path:
    return testing.write_distribution(tmp_path / "site", "slow-task", "1.0",
                                      {"finetune.tasks": {"slow-text": "slow_task:SlowText"}}, {"slow_task.py": SLOW_TASK})


def napping_run(tmp_path, model, data, site, where: str, name: str) -> subprocess.CompletedProcess:
    recipe = testing.text_recipe(model, data, tmp_path / name, "lora",
                                 train={"epochs": 1, "batch_size": 4, "distributed_timeout_minutes": 0.03})  # 1.8 s
    recipe["task"]["name"] = "slow-text"
    path = testing.write_recipe(tmp_path / f"{name}.yaml", recipe)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "NAP_WHERE": where, "NAP_SECONDS": "5"}
    return subprocess.run([sys.executable, "-m", "finetune", "run", str(path), "--processes", "2"], capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.mark.slow
def test_long_main_process_work_after_the_last_collective_outlives_a_short_timeout(tmp_path, own_model, small_data, slow_task_site):
    done = napping_run(tmp_path, own_model, small_data, slow_task_site, "outputs", "late")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "late" / "README.md").is_file()


@pytest.mark.slow
def test_the_timeout_is_honoured_inside_a_collective_wait(tmp_path, own_model, small_data, slow_task_site):
    done = napping_run(tmp_path, own_model, small_data, slow_task_site, "prepare_data", "early")
    assert done.returncode != 0
    assert "train.distributed_timeout_minutes (0.03)" in done.stderr


@pytest.mark.slow
def test_deepspeed_zero2_trains_what_ddp_trains_with_accumulation(tmp_path, own_model, small_data):
    # The engine must step once per accumulation window (not per micro-batch) and not rescale the losses.
    pytest.importorskip("deepspeed")
    config = Path(__file__).parents[1] / "recipes" / "accelerate" / "deepspeed-zero2.yaml"
    zero = launch("run", ddp_recipe(tmp_path, own_model, small_data, "zero2", grad_accum_steps=2, log_every_steps=1, epochs=3),
                  "--accelerate-config", config, "--processes", 2)
    assert zero.returncode == 0, zero.stderr[-3000:]
    ddp = launch("run", ddp_recipe(tmp_path, own_model, small_data, "ddp", grad_accum_steps=2, log_every_steps=1, epochs=3),
                 "--processes", 2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = step_records(tmp_path / "zero2"), step_records(tmp_path / "ddp")
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 3
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["lr"] == pytest.approx(y["lr"], rel=1e-9)
    wa, wb = load_file(tmp_path / "zero2" / "model" / "adapter_model.safetensors"), load_file(tmp_path / "ddp" / "model" / "adapter_model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_launch_command_lines_are_read_by_accelerate_and_torchrun_as_meant(monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from torch.distributed.run import get_args_parser

    from finetune.errors import FinetuneError
    from finetune.launch import Launch

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    configs = Path(__file__).parents[1] / "recipes" / "accelerate"

    def accelerate_args(launch: Launch):
        command = launch.command(["run", "r.yaml"])
        assert command[1:3] == ["-m", "accelerate.commands.launch"] and command[-4:] == ["-m", "finetune", "run", "r.yaml"]
        return _validate_launch_command(launch_command_parser().parse_args(command[3:]))[0]  # (args, defaults, ...)

    # A config's num_processes counts per machine: 8 GPUs on each of 2 machines are 16 processes.
    two_machines = accelerate_args(Launch(None, str(configs / "ddp.yaml"), nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29500"))
    assert (two_machines.num_processes, two_machines.num_machines, two_machines.machine_rank) == (16, 2, 1)
    assert (two_machines.main_process_ip, two_machines.main_process_port) == ("10.0.0.1", 29500)
    assert accelerate_args(Launch(4, str(configs / "ddp.yaml"))).num_processes == 4
    deepspeed = accelerate_args(Launch(8, str(configs / "deepspeed-zero2.yaml"), nnodes=2, rdzv_endpoint="h:1"))
    assert deepspeed.deepspeed_multinode_launcher == "standard"  # torchrun per machine, not pdsh

    torchrun = Launch(8, None, nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29500").command(["run", "r.yaml"])
    parsed = get_args_parser().parse_args(torchrun[3:])
    assert (parsed.nnodes, parsed.node_rank, parsed.rdzv_endpoint, parsed.nproc_per_node) == ("2", 1, "10.0.0.1:29500", "8")
    assert get_args_parser().parse_args(Launch(2, None).command(["run"])[3:]).standalone

    for bad, message in [
        (dict(processes=2, accelerate_config=None, nnodes=2), "needs --rdzv-endpoint"),
        (dict(processes=2, accelerate_config=None, rdzv_endpoint="h:1"), "add --nnodes"),
        (dict(processes=2, accelerate_config=None, nnodes=2, node_rank=2, rdzv_endpoint="h:1"), "is not below --nnodes 2"),
        (dict(processes=2, accelerate_config=None, nnodes=2, rdzv_endpoint="h"), "is not HOST:PORT"),
        (dict(processes=2, accelerate_config=str(configs / "fsdp-full-shard.yaml"), cpu=True), "silently train"),
    ]:
        with pytest.raises(FinetuneError, match=message):
            Launch(**bad)


@pytest.mark.parametrize("kind,method", [("text", "full"), ("text", "lora"), ("image", "full"), ("image", "lora")])
def test_a_save_from_gathered_weights_writes_the_same_model(kind, method, tmp_path, own_model, sentiment_dir, monkeypatch):
    # Under FSDP / ZeRO-3 the final save receives the full state dict gathered by accelerate instead of the
    # (sharded) model's own: on one process, with the engine check forced, it must write the very same files.
    if kind == "text":
        recipe = testing.text_recipe(own_model, sentiment_dir, tmp_path / "own", method, train={"max_steps": 3})
    else:
        model = testing.tiny_timm_model(tmp_path / "vit", "test_vit", num_classes=3)
        recipe = image_full(tmp_path / "own", model, color_folder(tmp_path))
        recipe["method"]["name"], recipe["train"]["max_steps"] = method, 3
    own = run_ok(tmp_path / "own.yaml", recipe)
    from accelerate import Accelerator

    import finetune.training.engine as engine

    gathers = []
    real = Accelerator.get_state_dict
    monkeypatch.setattr(engine, "is_sharded", lambda accelerator: True)
    monkeypatch.setattr(Accelerator, "get_state_dict", lambda self, model, unwrap=True: gathers.append(unwrap) or real(self, model, unwrap))
    gathered = run_ok(tmp_path / "gathered.yaml", {**recipe, "output": {"dir": str(tmp_path / "gathered")}})
    assert gathers.count(True) == 1  # the final save's gather, once (checkpoints take the wrapped model's: False)
    same_files(own / "model", gathered / "model")
    assert sorted(p.name for p in (own / "model").iterdir()) == sorted(p.name for p in (gathered / "model").iterdir())


def test_a_checkpoint_without_all_of_this_runs_trained_weights_is_refused(tmp_path, own_model, sentiment_dir):
    from safetensors.torch import save_file

    recipe = testing.text_recipe(own_model, sentiment_dir, tmp_path / "run", "lora", train={"epochs": 1},
                                 checkpoint={"every_steps": 4})
    rewind(run_ok(tmp_path / "run.yaml", recipe), tmp_path / "again")
    weights_file = checkpoints(tmp_path / "again")[0] / "model.safetensors"
    weights = load_file(weights_file)
    dropped = next(k for k in weights if "lora_A" in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, weights_file)
    again = {**recipe, "output": {"dir": str(tmp_path / "again")}}
    result = invoke("run", testing.write_recipe(tmp_path / "again.yaml", again), "--resume")
    assert result.exit_code == 1 and "lacks trained weights of this run" in result.output and dropped in result.output


def test_bfloat16_weights_under_a_fully_trained_batch_norm_keep_its_statistics_in_float32(tmp_path):
    model = testing.tiny_timm_model(tmp_path / "resnet", num_classes=3)
    recipe = image_full(tmp_path / "run", model, color_folder(tmp_path))
    recipe["model"]["dtype"], recipe["train"]["mixed_precision"] = "bfloat16", "bf16"
    run_dir = run_ok(tmp_path / "run.yaml", recipe)
    saved = load_file(run_dir / "model" / "model.safetensors")
    statistics = [k for k in saved if k.endswith(("running_mean", "running_var"))]
    assert statistics and all(saved[k].dtype == torch.float32 for k in statistics)
    assert all(v.dtype == torch.float32 for k, v in saved.items() if v.is_floating_point())  # everything trained: float32
