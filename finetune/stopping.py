"""Stopping gracefully when a scheduler preempts the job: SIGTERM (Kubernetes, spot instances,
`scancel`), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's `--signal=USR1@90`).

The first signal only raises a flag. The training loop reads it once per optimizer update,
agreed over every process (`requested_everywhere`), writes a checkpoint after the current step
and raises `Preempted`; `finetune run` then exits with `RESUMABLE` (75, sysexits' "temporary
failure, try again"), and the same command line with `--resume auto` continues where it stopped.
A second signal aborts at once (a checkpoint being written stays a hidden temporary folder that
resume ignores). The same signal often arrives twice within moments, once from the scheduler and
once forwarded by a launcher, so a repeat within `REPEAT_SECONDS` counts as the first.

A launcher (`finetune run --processes N`) does not stop itself: it forwards the first signal to its
processes and, on a second, kills them (`stopping_gracefully(launcher=True)`).
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager

from finetune.errors import FinetuneError

RESUMABLE = 75
"""The exit status of a run that stopped on a signal after writing a checkpoint: requeue it with --resume auto."""
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
REPEAT_SECONDS = 1.0


class Preempted(FinetuneError):
    """The run stopped on a signal, resumably: its latest checkpoint holds everything trained so far."""


class _Stop:
    """What a training process knows of the stop."""

    def __init__(self):
        self.signal: int = 0  # the first signal's number; 0: none yet
        self.at = 0.0
        self.saved = False  # the stop's checkpoint is complete: an abort now loses nothing

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""

    def handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if not self.signal:
            self.signal, self.at = signum, now
            if _speaks():
                _say(f"finetune: {self.name} received: stopping after the current step with a checkpoint (a second "
                     "signal aborts at once).")
            return
        if now - self.at < REPEAT_SECONDS:  # the same stop, delivered again (by the scheduler and a launcher)
            return
        if self.saved:
            os._exit(RESUMABLE)
        _say(f"finetune: {signal.Signals(signum).name} received again: aborting now.")
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


class _Forward:
    """What a launcher knows of the stop: it passes the first signal on to its processes and kills them on a second."""

    def __init__(self):
        self.signal: int = 0
        self.aborted = False

    def handle(self, signum: int, frame) -> None:
        children = _children()
        if not self.signal:
            self.signal = signum
            _say(f"finetune: {signal.Signals(signum).name} received: the processes stop after their current step "
                 "with a checkpoint (a second signal aborts at once).")
            for pid in children:
                _send(pid, signum, group=False)
            return
        _say("finetune: aborting the processes now.")
        self.aborted = True
        for pid in children:
            _send(pid, signal.SIGKILL, group=True)  # with their DataLoader workers


STOP = _Stop()


@contextmanager
def stopping_gracefully(launcher: bool = False):
    """Within the block, the preemption signals stop this process gracefully (a training process) or are passed on
    to its children (a launcher); the previous handlers come back afterwards (`main([...])` in a notebook or a test
    keeps its own Ctrl-C)."""
    if launcher:
        handler = _Forward()
    else:
        STOP.__init__()  # a fresh run in this process
        handler = STOP
    previous = {sig: signal.signal(sig, handler.handle) for sig in SIGNALS}
    try:
        yield handler
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def requested_everywhere(accelerator) -> int:
    """The signal any process has received (0: none), the same on every process: a collective, so every process
    must call it at the same point of the loop."""
    if accelerator.num_processes == 1:
        return STOP.signal
    import torch

    flag = torch.tensor(float(STOP.signal), device=accelerator.device)
    return int(accelerator.reduce(flag, reduction="max").item())


def ignore_in_loader_workers(worker_id: int) -> None:
    """DataLoader worker processes share the training process's process group, so a launcher's or a terminal's
    signal reaches them too; they must not die of it (their training process ends them)."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _children() -> list[int]:
    import psutil  # accelerate's dependency

    return [child.pid for child in psutil.Process().children()]


def _send(pid: int, sig: int, group: bool) -> None:
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # it has exited already


def _speaks() -> bool:
    """Whether this training process tells the user about the signal: the first of a run, unless finetune's own
    launcher has told them already."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("FINETUNE_LAUNCHED") != "1"


def _say(message: str) -> None:
    os.write(2, f"\n{message}\n".encode())  # not print(): a handler may interrupt a print to the same stream
