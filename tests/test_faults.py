"""What long jobs on shared clusters meet: preemption signals, full disks, broken data files, servers
that echo secrets, out-of-memory. Every check runs on the CPU, offline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from finetune import testing
from finetune.cli import main
from finetune import stopping
from finetune.stopping import RESUMABLE
from finetune.tasks.text_classification import TextClassification


def invoke(*args):
    testing.fresh_accelerate_state()
    return CliRunner().invoke(main, [str(a) for a in args])


def same_weights(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert files, f"no weights in {a}"
    for relative in files:
        x, y = load_file(a / relative), load_file(b / relative)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), relative


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))


@pytest.fixture(scope="module")
def model(distilbert_dir) -> Path:
    return distilbert_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    testing.write_jsonl(directory / "train.jsonl", testing.sentiment_examples(48, seed=1))
    testing.write_jsonl(directory / "test.jsonl", testing.sentiment_examples(16, seed=2))
    return directory


def recipe(tmp_path: Path, model: Path, data: Path, name: str, method: str = "lora", **sections) -> Path:
    sections.setdefault("train", {"epochs": 2, "batch_size": 8, "log_every_steps": 1})
    return testing.write_recipe(tmp_path / f"{name}.yaml", testing.text_recipe(model, data, tmp_path / name, method, **sections))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, model, data) -> Path:
    """The reference: the LoRA recipe trained without interruption (12 steps, a checkpoint per epoch)."""
    work = tmp_path_factory.mktemp("reference")
    result = invoke("run", recipe(work, model, data, "run"))
    assert result.exit_code == 0, result.output
    return work / "run"


# -- preemption ---------------------------------------------------------------------------------
def signal_at_step(monkeypatch, step: int, sig=signal.SIGTERM) -> None:
    """Deliver `sig` to this process during the forward pass of training step `step` (1-based), as a scheduler would."""
    calls = {"n": 0}
    original = TextClassification.training_step

    def training_step(self, model, batch):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), sig)
            while not stopping.STOP.signal:  # the signal thread has seen it (within microseconds, in a real run too)
                time.sleep(0.001)
        return original(self, model, batch)

    monkeypatch.setattr(TextClassification, "training_step", training_step)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_auto_finishes_identically(
        sig, tmp_path, model, data, uninterrupted, monkeypatch):
    path = recipe(tmp_path, model, data, "run")
    signal_at_step(monkeypatch, 4, sig)
    stopped = invoke("run", path, "--resume", "auto")  # nothing to resume yet: a fresh start
    assert stopped.exit_code == RESUMABLE, stopped.output
    assert f"Stopped on {sig.name} after step 4 of 12" in stopped.output and "--resume auto" in stopped.output
    assert checkpoints(tmp_path / "run") == ["step-00000004"]  # the stop's own checkpoint, mid-epoch
    assert not (tmp_path / "run" / "model").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the caller's handlers are back
    monkeypatch.undo()

    resumed = invoke("run", path, "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    assert "Resuming from" in resumed.output and "(step 4 of 12)" in resumed.output
    same_weights(uninterrupted / "model", tmp_path / "run" / "model")
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert final == json.loads((uninterrupted / "metrics.json").read_text())["metrics"]


def test_resume_auto_starts_afresh_over_a_run_that_died_before_its_first_checkpoint(
        tmp_path, model, data, uninterrupted, monkeypatch):
    path = recipe(tmp_path, model, data, "run")
    original = TextClassification.training_step

    def dying_step(self, model, batch):
        raise KeyboardInterrupt  # what `kill -9` in epoch 1 leaves, as far as the run directory goes

    monkeypatch.setattr(TextClassification, "training_step", dying_step)
    assert invoke("run", path).exit_code != 0
    assert (tmp_path / "run" / "recipe.yaml").is_file() and not checkpoints(tmp_path / "run")
    monkeypatch.setattr(TextClassification, "training_step", original)
    assert invoke("run", path).exit_code == 1  # a plain start refuses the directory it left
    started = invoke("run", path, "--resume", "auto")  # auto starts afresh over it
    assert started.exit_code == 0, started.output
    assert "Resuming" not in started.output
    same_weights(uninterrupted / "model", tmp_path / "run" / "model")
    again = invoke("run", path, "--resume", "auto")  # requeued once more: the run is finished, nothing to do
    assert again.exit_code == 0 and "finished" in again.output and "Resuming" not in again.output


# -- full disks -----------------------------------------------------------------------------------
DISK_DRIVER = """
import resource, sys
from finetune.tasks.text_classification import TextClassification

limit, where, arguments = int(sys.argv[1]), sys.argv[2], sys.argv[3:]


def fill_the_disk():  # from here on no file of this process may grow past `limit` bytes: writes fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


if where == "save":
    save = TextClassification.save
    def patched_save(self, *args, **kwargs):
        fill_the_disk()
        return save(self, *args, **kwargs)
    TextClassification.save = patched_save
else:
    step, calls = int(where), [0]
    training_step = TextClassification.training_step
    def patched_step(self, model, batch):
        calls[0] += 1
        if calls[0] == step:
            fill_the_disk()
        return training_step(self, model, batch)
    TextClassification.training_step = patched_step

from finetune.cli import main
main(arguments)
"""


def run_with_a_full_disk(tmp_path: Path, limit: int, where: str, *arguments) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(DISK_DRIVER)
    return subprocess.run([sys.executable, str(driver), str(limit), where, *map(str, arguments)], capture_output=True,
                          text=True, timeout=600)


def test_a_full_disk_while_writing_a_checkpoint_is_one_message_and_resume_finishes_identically(
        tmp_path, model, data, uninterrupted):
    path = recipe(tmp_path, model, data, "run")
    optimizer_bytes = (uninterrupted / "checkpoints" / "step-00000012" / "optimizer.bin").stat().st_size
    # From step 7 on: the step-12 checkpoint's weights still fit, its optimizer state (torch.save) does not.
    failed = run_with_a_full_disk(tmp_path, optimizer_bytes // 2, "7", "run", path)
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "Could not write the checkpoint step-00000012" in failed.stderr and "file-size limit" in failed.stderr
    assert f"the last complete checkpoint, {tmp_path / 'run' / 'checkpoints' / 'step-00000006'}" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000006"]  # no half-written one

    resumed = invoke("run", path, "--resume")  # space freed
    assert resumed.exit_code == 0, resumed.output
    same_weights(uninterrupted / "model", tmp_path / "run" / "model")


def test_a_full_disk_while_writing_the_final_model_is_one_message_and_resume_finishes_identically(
        tmp_path, model, data, uninterrupted):
    path = recipe(tmp_path, model, data, "run")
    failed = run_with_a_full_disk(tmp_path, 1024, "save", "run", path)
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "Could not write the final model, metrics and card" in failed.stderr and "Traceback" not in failed.stderr
    assert "step-00000012" in failed.stderr
    run_dir = tmp_path / "run"
    assert not (run_dir / "model").exists() and not (run_dir / "metrics.json").exists()
    assert not list(run_dir.glob(".*.tmp"))  # the partial model was removed
    assert checkpoints(run_dir) == ["step-00000006", "step-00000012"]

    resumed = invoke("run", path, "--resume")
    assert resumed.exit_code == 0, resumed.output
    same_weights(uninterrupted / "model", run_dir / "model")


@pytest.mark.parametrize("method, merged", [("lora", True), ("full", False)])
def test_a_run_warns_at_its_start_when_a_checkpoint_and_the_final_model_would_not_fit(
        method, merged, tmp_path, model, data, monkeypatch):
    from finetune import storage

    estimates = []
    real_warning = storage.space_warning

    def recording_warning(path, needed):
        estimates.append(needed)
        return real_warning(path, needed)

    monkeypatch.setattr(storage, "space_warning", recording_warning)
    monkeypatch.setattr(storage, "free_bytes", lambda path: 1000)
    result = invoke("run", recipe(tmp_path, model, data, "run", method, train={"max_steps": 2, "batch_size": 8},
                                  output={"merged": merged}))
    assert result.exit_code == 0, result.output
    needed = estimates[0]
    assert (f"warning: 1000 B free on the filesystem of {tmp_path / 'run'}, but a checkpoint takes about "
            f"{storage.size(needed['checkpoint'])} and the final model about {storage.size(needed['final_model'])}") \
        in " ".join(result.output.split())

    # The estimates are the bytes of the tensors the run then wrote: the checkpoint's trainable weights and buffers
    # with the two AdamW states of each trainable weight; the final model (its merged copy too).
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=True)["state"].values()
    moments = sum(state[k].nbytes for state in optimizer for k in ("exp_avg", "exp_avg_sq"))
    assert needed["checkpoint"] == tensor_bytes(checkpoint) + moments
    final = tensor_bytes(tmp_path / "run" / "model") + (tensor_bytes(tmp_path / "run" / "model-merged") if merged else 0)
    assert needed["final_model"] == final


def tensor_bytes(folder: Path) -> int:
    return sum(t.nbytes for f in folder.glob("*.safetensors") for t in load_file(f).values())


# -- preemption: a second signal ------------------------------------------------------------------
NAPPING_TASK = """
import os, time
from finetune.tasks.text_classification import TextClassification


def nap(where):
    if os.environ.get("NAP_WHERE") == where:
        time.sleep(float(os.environ["NAP_SECONDS"]))


class NappingText(TextClassification):
    def preprocess(self, splits, task_model):
        nap("preprocess")  # slow tokenising, before the first step
        return super().preprocess(splits, task_model)

    def training_step(self, model, batch):
        nap("training_step")  # a slow step, long enough for two signals
        return super().training_step(model, batch)
"""


def start_napping_run(tmp_path: Path, model: Path, data: Path, where: str, *arguments) -> tuple[subprocess.Popen, Path]:
    site = tmp_path / "site"
    if not site.exists():
        testing.write_distribution(site, "napping-task", "1.0", {"finetune.tasks": {"napping-text": "napping_task:NappingText"}},
                                   {"napping_task.py": NAPPING_TASK})
    body = testing.text_recipe(model, data, tmp_path / "run", "lora", train={"epochs": 2, "batch_size": 8, "log_every_steps": 1})
    body["task"]["name"] = "napping-text"
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "NAP_WHERE": where,
           "NAP_SECONDS": "30" if where == "preprocess" else "4"}
    output = tmp_path / f"{where}.log"
    process = subprocess.Popen([sys.executable, "-m", "finetune", "run", str(testing.write_recipe(tmp_path / "r.yaml", body)),
                                *arguments], stdout=output.open("w"), stderr=subprocess.STDOUT, env=env)
    return process, output


def wait_for(condition, process: subprocess.Popen, output: Path) -> None:
    while not condition():
        assert process.poll() is None, output.read_text()[-3000:]
        time.sleep(0.1)


def test_a_signal_before_training_stops_at_once_and_a_second_signal_aborts_a_step(tmp_path, model, data):
    # While the data is tokenised there is nothing to save: the process exits 75 at once, the run directory unmade.
    process, output = start_napping_run(tmp_path, model, data, "preprocess", "--resume", "auto")
    wait_for(lambda: "training 3,170 of" in output.read_text(), process, output)  # the model is built
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == RESUMABLE, output.read_text()[-3000:]
    assert "received before training began: nothing to save" in output.read_text()
    assert not (tmp_path / "run").exists()  # it did not wait for the 30 s of tokenising to end

    # Requeued (--resume auto starts afresh), then signalled twice during a step: the second aborts, with no checkpoint.
    process, output = start_napping_run(tmp_path, model, data, "training_step", "--resume", "auto")
    steplog = tmp_path / "run" / "logs" / "steps.jsonl"
    wait_for(lambda: steplog.is_file() and steplog.read_text(), process, output)  # step 1 is logged: step 2 naps
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    time.sleep(1.5)  # a repeat within a second would count as the same signal delivered twice
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM  # a graceful stop would end step 2 and exit 75
    text = output.read_text()
    assert "stopping after the current step" in text and "received again: aborting now" in text
    assert not checkpoints(tmp_path / "run") and "Stopped on" not in text


# -- out of memory ----------------------------------------------------------------------------------
def test_out_of_memory_names_the_step_the_batch_what_to_try_and_the_checkpoint(tmp_path, model, data, monkeypatch):
    calls = {"n": 0}
    original = TextClassification.training_step

    def training_step(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 8:  # in epoch 2, after the checkpoint of step 6
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, model, batch)

    monkeypatch.setattr(TextClassification, "training_step", training_step)
    result = invoke("run", recipe(tmp_path, model, data, "run", "full"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert "Out of memory on cpu during step 8 of 12 (train.batch_size 8 × train.grad_accum_steps 1 per device)" in message
    assert "batch_size: 4, grad_accum_steps: 2" in message and "train.gradient_checkpointing: true" in message
    assert "train.mixed_precision: bf16" in message and "method lora" in message
    assert f"The last complete checkpoint is {tmp_path / 'run' / 'checkpoints' / 'step-00000006'}" in message


# -- data files -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, content, line, problem", [
    ("train.jsonl", '{"text": "great", "label": "positive"}\n{"text": "awful", "lab\n{"text": "ok", "label": "negative"}\n',
     2, "not a complete JSON object"),
    ("train.csv", "text,label\ngreat,positive\nawful,negative,extra\n", 3, "3 fields where the header has 2"),
    ("train.csv", "text,label\ngreat,positive\nawful\n", 3, "1 field where the header has 2"),
])
def test_a_malformed_line_is_named_by_file_line_and_excerpt(tmp_path, model, name, content, line, problem):
    (tmp_path / name).write_text(content)
    body = testing.text_recipe(model, tmp_path, tmp_path / "run", "lora", data={"files": {"train": str(tmp_path / name)}})
    result = invoke("run", testing.write_recipe(tmp_path / "r.yaml", body))
    assert result.exit_code == 1
    bad_line = content.splitlines()[line - 1]
    assert f"data.files: {tmp_path / name}, line {line}: {problem}" in result.output and repr(bad_line) in result.output
    assert "Hub" not in result.output and "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_hub_advice_only_for_data_from_the_hub(tmp_path, model):
    body = testing.text_recipe(model, tmp_path, tmp_path / "run", "lora")
    body["data"] = {"path": "someone/no-such-dataset"}
    result = invoke("run", testing.write_recipe(tmp_path / "r.yaml", body))
    assert result.exit_code == 1 and "data.path: could not load the dataset 'someone/no-such-dataset'" in result.output
    assert "without access to the Hugging Face Hub" in result.output


# -- secrets ----------------------------------------------------------------------------------------
def test_redact_masks_environment_tokens_the_token_file_and_hub_shaped_strings(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from finetune.redaction import redact

    token_file = tmp_path / "token"
    token_file.write_text("stored-login-token-123\n")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_file))
    monkeypatch.setenv("HF_TOKEN", "env-token-abcdef")
    monkeypatch.setenv("WANDB_API_KEY", "wandb-key-987654")
    monkeypatch.setenv("SSL_KEY_FILE", "/etc/ssl/private/finetune.key")  # where a secret is, not the secret
    text = ("env-token-abcdef stored-login-token-123 wandb-key-987654 hf_" + "a1B2" * 9
            + " Authorization: Bearer opaque.jwt.value and Basic dXNlcjpwYXNz, via http://bob:s3cret@proxy:3128/;"
            " Basic tokenization of /etc/ssl/private/finetune.key, 42 steps")
    assert redact(text) == ("*** *** *** *** Authorization: Bearer *** and Basic ***, via http://***@proxy:3128/; "
                            "Basic tokenization of /etc/ssl/private/finetune.key, 42 steps")
