"""Starting the processes of a run on the launchers users already trust: torchrun for DDP over
one or several machines, `accelerate launch` for a config file (DDP, FSDP, DeepSpeed).

`finetune run RECIPE --processes 4` re-runs that same command line under torchrun, one process
per GPU; with `--nnodes/--node-rank/--rdzv-endpoint` the processes of every machine meet at node
0's address (torchrun's static rendezvous: each machine's rank is the one it is given).
`--accelerate-config FILE` hands the command to `accelerate launch --config_file FILE`, which sets
the engine for the processes through the environment, exactly as
`accelerate launch --config_file FILE -m finetune run RECIPE` would.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from finetune.errors import FinetuneError


ENGINES = ("MULTI_GPU", "FSDP", "DEEPSPEED")
"""The accelerate config types finetune launches (accelerate's own MULTI_CPU needs MPI to start several processes)."""


@dataclass
class Launch:
    processes: int | None
    """Processes per machine; None: 1, or the accelerate config's num_processes (read as per machine)."""
    accelerate_config: str | None
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    cpu: bool = False
    config: object = field(init=False, default=None, repr=False)
    """The accelerate config file as accelerate's loader read it."""

    def __post_init__(self):
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise FinetuneError("--nnodes: a job over several machines needs --rdzv-endpoint HOST:PORT, the address of node 0 "
                                "that every machine can reach (e.g. $MASTER_ADDR:29500 under SLURM).")
        if self.nnodes == 1 and self.rdzv_endpoint:
            raise FinetuneError("--rdzv-endpoint: it joins the machines of a job over several; add --nnodes N (and --node-rank), "
                                "or remove it for a run on this machine alone.")
        if self.node_rank >= self.nnodes:
            raise FinetuneError(f"--node-rank: {self.node_rank} is not below --nnodes {self.nnodes}; machines are numbered 0 to nnodes-1.")
        if self.rdzv_endpoint and (":" not in self.rdzv_endpoint or not self.rdzv_endpoint.rsplit(":", 1)[1].isdigit()):
            raise FinetuneError(f"--rdzv-endpoint: '{self.rdzv_endpoint}' is not HOST:PORT (e.g. 10.0.0.1:29500).")
        started_elsewhere = "LOCAL_RANK" in os.environ and os.environ.get("FINETUNE_LAUNCHED") != "1"
        if started_elsewhere and (self.accelerate_config or self.nnodes > 1):
            raise FinetuneError("--accelerate-config / --nnodes: this process was started by a launcher already (torchrun or "
                                "accelerate launch set LOCAL_RANK); give those settings to that launcher, or run `finetune run` alone.")
        self.config = check_accelerate_config(self.accelerate_config) if self.accelerate_config else None
        if self.config is not None and self.cpu and self.engine in ("FSDP", "DEEPSPEED"):
            raise FinetuneError(f"--cpu: accelerate runs {self.engine} on GPUs only, and on the CPU would silently train "
                                f"with plain DDP instead. Remove --cpu, or use recipes/accelerate/ddp-cpu.yaml.")

    @property
    def engine(self) -> str | None:
        return None if self.config is None else str(self.config.distributed_type).rsplit(".", 1)[-1]

    @property
    def needed(self) -> bool:
        """Whether this process must start the run's processes (it is not one of them already)."""
        launched = "LOCAL_RANK" in os.environ or os.environ.get("FINETUNE_LAUNCHED") == "1"
        return not launched and ((self.processes or 1) > 1 or self.nnodes > 1 or self.accelerate_config is not None)

    def command(self, arguments: list[str]) -> list[str]:
        """The launcher's command line that runs `finetune <arguments>` in every process."""
        if self.config is not None:
            per_machine = self.processes or self.config.num_processes or 1
            command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", self.accelerate_config,
                       "--num_processes", str(per_machine * self.nnodes)]  # accelerate counts them over all machines
            if self.nnodes > 1:
                host, port = self.rdzv_endpoint.rsplit(":", 1)
                command += ["--num_machines", str(self.nnodes), "--machine_rank", str(self.node_rank),
                            "--main_process_ip", host, "--main_process_port", port]
                if self.engine == "DEEPSPEED":  # torchrun on each machine, not pdsh reaching out from every one
                    command += ["--deepspeed_multinode_launcher", "standard"]
            return [*command, "-m", "finetune", *arguments]
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={self.processes or 1}"]
        if self.nnodes == 1:
            command.append("--standalone")
        else:
            command += [f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}", f"--rdzv-endpoint={self.rdzv_endpoint}"]
        return [*command, "-m", "finetune", *arguments]

    def start(self, arguments: list[str], env: dict[str, str]) -> int:
        """Run the launcher in this process (as `accelerate launch` runs torchrun), so that its processes' exit
        statuses are known here: `stopping.RESUMABLE` when the processes stopped resumably on a signal. The
        preemption signals are passed on to the processes (finetune.stopping), not handled by torchrun's agent,
        which would kill them 30 s later. What the launcher changes in this process (environment, signal handlers,
        the thread's name, a logging filter) is put back afterwards."""
        import logging
        import signal
        import threading

        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        from finetune.stopping import stopping_gracefully

        agent_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
        saved_env, saved_name = dict(os.environ), threading.current_thread().name
        saved_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGQUIT)}
        os.environ.update(env)
        os.environ["PET_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"  # torchrun's --signals-to-handle, read by both launchers
        agent_log.addFilter(_not_a_resumable_exit)
        try:
            with stopping_gracefully(launcher=True) as stop:
                try:
                    self._run_launcher(self.command(arguments)[3:])  # without `python -m MODULE`
                except ChildFailedError as failed:
                    return _status(failed, stop)
                except SignalException as exc:  # SIGHUP / SIGQUIT: the agent has ended the processes
                    return 128 + exc.sigval
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
            threading.current_thread().name = saved_name
            for sig, handler in saved_handlers.items():
                if handler is not None:
                    signal.signal(sig, handler)
            agent_log.removeFilter(_not_a_resumable_exit)
        return 0

    def _run_launcher(self, arguments: list[str]) -> None:
        if self.config is not None:
            from accelerate.commands.launch import launch_command, launch_command_parser

            launch_command(launch_command_parser().parse_args(arguments))
        else:
            from torch.distributed.run import parse_args, run

            run(parse_args(arguments))


def _status(failed, stop) -> int:
    """The launcher's exit status when some process ended non-zero: resumable when each of them stopped on the
    signal (75), or died of it (before it could handle it, or of the agent's SIGTERM to the rest once one had
    exited); 128 + the signal after an abort; otherwise 1, with torchrun's account of the failures."""
    import signal

    from finetune.stopping import RESUMABLE

    if stop.aborted:
        return 128 + stop.aborted
    codes = {failure.exitcode for failure in failed.failures.values()}
    # Without a signal here, one reached the processes directly (SLURM signals every process of a job step).
    stopped = {RESUMABLE, -stop.signal, -signal.SIGTERM} if stop.signal else {RESUMABLE}
    if codes <= stopped:
        return RESUMABLE
    print(failed, file=sys.stderr)
    return 1


def _not_a_resumable_exit(record) -> bool:
    """torchrun's agent logs every process that exits non-zero as a failure; one that stopped resumably did not fail."""
    from finetune.stopping import RESUMABLE

    return f"(exitcode: {RESUMABLE})" not in record.getMessage()


def check_accelerate_config(path: str):
    """The file parsed by accelerate's own config loader (a typo is named now, not in every process later), of a
    type finetune launches."""
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        config = load_config_from_file(path)
    except Exception as exc:  # ValueError for unknown keys, yaml errors, a missing distributed_type
        raise FinetuneError(f"--accelerate-config: accelerate cannot read {path}: {type(exc).__name__}: {exc}") from None
    engine = str(getattr(config, "distributed_type", "")).rsplit(".", 1)[-1]
    if engine not in ENGINES:
        raise FinetuneError(
            f"--accelerate-config: {path} has distributed_type {engine}; finetune launches {', '.join(ENGINES)} configs "
            "(accelerate starts several CPU processes of its MULTI_CPU type only through MPI). For CPU processes use "
            "recipes/accelerate/ddp-cpu.yaml or --processes N."
        )
    return config
