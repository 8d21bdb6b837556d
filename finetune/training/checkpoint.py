"""Checkpoints that are either complete or absent.

What a checkpoint holds is accelerate's state (optimizer, scheduler, RNG, sampler) with the
weights that training changes (finetune.training.trainable_state), and `trainer_state.json`.
A checkpoint is written into a hidden `.step-N.tmp` folder (finetune.files) and renamed to
`step-N` only once every process has written its part: a crash mid-write leaves a temporary
folder that resume ignores (and the next save clears), never a `step-N` that looks complete but is not.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from finetune.files import commit, remove, temporary_path
from finetune.training.state import TrainerState
from finetune.training.trainable_state import TrainableState

STATE_FILE = "trainer_state.json"


def checkpoint_dir(directory: Path, step: int) -> Path:
    return directory / f"step-{step:08d}"


def save_checkpoint(accelerator, directory: Path, state: TrainerState, trainable: TrainableState, keep_last: int,
                    protected: int | None = None) -> Path:
    """Save the run at `state.step`, then delete all but the `keep_last` newest checkpoints, never
    the one of step `protected` (the best evaluation's, which the run may restore at its end)."""
    final = checkpoint_dir(directory, state.step)
    tmp = temporary_path(final)
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        for leftover in directory.glob(".step-*.tmp"):  # of this save, or of a process killed while it saved
            remove(leftover)
    accelerator.wait_for_everyone()
    try:
        # The trained weights, optimizer, scheduler and RNG states of every process.
        accelerator.save_state(str(tmp), **trainable.save_options)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            trainable.write_fingerprint(tmp)
            (tmp / STATE_FILE).write_text(state.to_json())
    except BaseException:
        if accelerator.is_main_process:
            remove(tmp)  # what was written of it (its space is wanted back after a full disk)
        raise
    if accelerator.is_main_process:
        commit(tmp, final)  # the commit point
        kept = checkpoint_dir(directory, protected) if protected is not None else None
        for old in list_checkpoints(directory)[:-keep_last]:
            if old != kept:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(directory: Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_checkpoint(accelerator, checkpoint: Path, trainable: TrainableState) -> TrainerState:
    trainable.check_base(checkpoint)  # before anything is loaded: a refusal leaves the model as it is
    accelerator.load_state(str(checkpoint), **trainable.load_options)
    return TrainerState.from_json((checkpoint / STATE_FILE).read_text())
