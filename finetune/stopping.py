"""Stopping gracefully when a scheduler preempts the job: SIGTERM (Kubernetes, spot instances,
`scancel`), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's `--signal=USR1@90`).

The first signal only raises a flag. The training loop reads it once per optimizer update,
agreed over every process (`requested_everywhere`), writes a checkpoint after the current step
and raises `Preempted`; `finetune run` then exits with `RESUMABLE` (75, sysexits' "temporary
failure, try again"), and the same command line with `--resume auto` continues where it stopped.
Before the first step there is nothing to save, and the process exits 75 at once (a single process
through a KeyboardInterrupt in its main thread, so that `main([...])` in a notebook survives it).

A second signal aborts at once, with status 128 + its number (a checkpoint being written stays a
hidden temporary folder that resume ignores). The same signal often arrives twice within moments,
once from the scheduler and once passed on by a launcher, so a repeat within `REPEAT_SECONDS`
counts as the first. Once the stop's checkpoint is complete, further signals change nothing: the
process is leaving.

Signals are read by a thread from Python's wakeup file descriptor, not by a Python-level handler:
a handler runs only when the main thread returns to the interpreter, which may be minutes away
(inside a CUDA or NCCL call, a large save), and the repeat window must be measured at arrival.

A launcher (`finetune run --processes N`) does not stop itself: it passes the first signal on to
its processes and kills them on a second (`stopping_gracefully(launcher=True)`).
"""

from __future__ import annotations

import os
import signal
import threading
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
    """What a training process knows of the stop. `on_signal` runs in the watcher thread."""

    def __init__(self):
        self.signal: int = 0  # the first signal's number; 0: none yet
        self.at = 0.0
        self.training = False  # the first step has begun: from here on a stop saves a checkpoint first
        self.saved = False  # the stop's checkpoint is complete: the process is leaving
        self.interrupted = 0  # the signal that stopped a single process before training, in its main thread

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""

    def in_main_thread(self, signum: int, frame) -> None:
        """The Python-level handler. The watcher thread decides; before training, a single process is stopped here."""
        if not self.training and "LOCAL_RANK" not in os.environ:
            self.interrupted = signum  # not self.signal: that is the watcher's, which may not have read it yet
            raise KeyboardInterrupt

    def on_signal(self, signum: int, now: float) -> None:
        if not self.signal:
            self.signal, self.at = signum, now
            if not self.training:
                _say(f"finetune: {self.name} received before training began: nothing to save, stopping now (exit "
                     f"{RESUMABLE}; --resume auto starts afresh).", _speaks())
                if "LOCAL_RANK" in os.environ:  # one of several processes, which may wait in a barrier for long
                    os._exit(RESUMABLE)
                # One process, maybe a notebook's: `in_main_thread` raises KeyboardInterrupt, which `finetune run`
                # turns into exit 75.
            _say(f"finetune: {self.name} received: stopping after the current step with a checkpoint (a second signal "
                 "aborts at once).", _speaks())
        elif now - self.at >= REPEAT_SECONDS and not self.saved:  # a repeat within the window: the same stop again
            _say(f"finetune: {signal.Signals(signum).name} received again: aborting now.", True)
            os._exit(128 + signum)


class _Forward:
    """What a launcher knows of the stop: it passes the first signal on to its processes (also to those it starts
    after the signal came) and kills them on a second."""

    def __init__(self):
        self.signal: int = 0
        self.at = 0.0
        self.aborted = 0  # the signal that aborted the processes
        self.done = threading.Event()

    def on_signal(self, signum: int, now: float) -> None:
        if not self.signal:
            self.signal, self.at = signum, now
            _say(f"finetune: {signal.Signals(signum).name} received: the processes stop after their current step "
                 "with a checkpoint (a second signal aborts at once).", True)
            threading.Thread(target=self._pass_on, args=(signum,), daemon=True).start()
        elif now - self.at >= REPEAT_SECONDS and not self.aborted:
            _say("finetune: aborting the processes now.", True)
            self.aborted = signum
            for pid in _children():
                _send(pid, signal.SIGKILL, group=True)  # with their DataLoader workers

    def _pass_on(self, signum: int) -> None:
        sent: set[int] = set()
        while not self.done.is_set() and not self.aborted:
            for pid in set(_children()) - sent:
                _send(pid, signum, group=False)
                sent.add(pid)
            self.done.wait(0.2)


STOP = _Stop()


@contextmanager
def stopping_gracefully(launcher: bool = False):
    """Within the block, the preemption signals stop this process gracefully (a training process) or are passed on
    to its children (a launcher). Outside the main thread nothing is installed (Python allows signal handlers only
    there). The previous handlers come back afterwards: `main([...])` in a notebook or a test keeps its own Ctrl-C."""
    STOP.__init__()  # a fresh run in this process
    handler = _Forward() if launcher else STOP
    if threading.current_thread() is not threading.main_thread():
        yield handler
        return
    read, write = os.pipe()
    os.set_blocking(write, False)
    previous = {sig: signal.signal(sig, _noted if launcher else STOP.in_main_thread) for sig in SIGNALS}
    previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    watcher = threading.Thread(target=_watch, args=(read, handler), name="finetune-signals", daemon=True)
    watcher.start()
    try:
        yield handler
    finally:
        signal.set_wakeup_fd(previous_fd)
        for sig, old in previous.items():
            if old is not None:  # None: a handler installed from C, which cannot be put back from Python
                signal.signal(sig, old)
        os.close(write)  # the watcher reads the end of the pipe and stops
        watcher.join(timeout=5)
        if launcher:
            handler.done.set()
        STOP.__init__()


def _noted(signum: int, frame) -> None:
    """A launcher's Python-level handler: the signal was written to the wakeup fd already, the watcher acts on it."""


def _watch(read: int, handler) -> None:
    with os.fdopen(read, "rb", buffering=0) as pipe:
        while chunk := pipe.read(64):
            now = time.monotonic()
            for signum in chunk:
                if signum in SIGNALS:
                    handler.on_signal(signum, now)


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


def _say(message: str, loud: bool) -> None:
    if loud:
        os.write(2, f"\n{message}\n".encode())  # not print(): the main thread may be inside a print to this stream
