"""Graceful shutdown on SIGINT / SIGTERM / SIGUSR1, and the exact command that resumes a run.

The first signal only sets a flag: the trainer finishes the optimizer step it is in, saves ``latest``,
flushes its trackers and exits 0. A second SIGINT exits at once (status 130) without writing anything;
every checkpoint already on disk stays valid because saves are atomic. Repeated SIGTERM/SIGUSR1 are ignored
(schedulers often send several before their final SIGKILL).

In multi-process runs a signal may reach only some ranks (``kill -USR1`` of one pid, a preempted node):
``should_stop()`` agrees across ranks with a background all-reduce, so all ranks stop after the same step.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from hf_gpt2_train import launch_world_size
from hf_gpt2_train.checkpoint.sync import LaggedAnyFlag

HANDLED = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGUSR1,) if hasattr(signal, "SIGUSR1") else ())


class GracefulShutdown:
    """Context manager (or ``install()``/``uninstall()``) that turns termination signals into a stop request."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._flag = LaggedAnyFlag()

    def install(self) -> GracefulShutdown:
        if threading.current_thread() is not threading.main_thread():
            return self  # Python only delivers signals to the main thread
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self._flag.drain()

    def __enter__(self) -> GracefulShutdown:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        rank = os.environ.get("RANK")
        who = f"[rank {rank}] " if rank is not None and launch_world_size() > 1 else ""
        # os.write, not print: a handler may interrupt a print of the main thread (re-entrant I/O error).
        if self.requested:
            if signum == signal.SIGINT:
                os.write(2, f"\n{who}second SIGINT: exiting now without saving (checkpoints on disk stay "
                            "valid)\n".encode())
                os._exit(130)
            return
        self.requested, self.signal_name = True, name
        os.write(2, f"\n{who}{name} received: finishing the current step, saving 'latest', then exiting "
                    "(press Ctrl-C again to exit at once without saving)\n".encode())

    def should_stop(self) -> bool:
        """Whether to stop after this optimizer step; the same answer on every rank (call once per step).

        Single-process: the local flag. Multi-process: the OR over ranks of the flags at the previous call,
        reduced in the background on a CPU group, so no step ever waits for it.
        """
        return self._flag.update(self.requested)


def _launcher() -> list[str]:
    """How this process was started, as the argv prefix before the subcommand."""
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    world = launch_world_size()
    if "ACCELERATE_DYNAMO_BACKEND" in os.environ:  # set by `accelerate launch` only
        procs = ["--num_processes", str(world)] if world > 1 else []
        return ["accelerate", "launch", *procs, "-m", "hf_gpt2_train"]
    if world > 1 or os.environ.get("TORCHELASTIC_RUN_ID"):
        local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)) or world)
        nnodes = max(1, world // max(1, local))
        nodes = ["--nnodes", str(nnodes)] if nnodes > 1 else []
        return ["torchrun", *nodes, "--nproc_per_node", str(local), "-m", "hf_gpt2_train"]
    if prog == "hf-gpt2-train":
        return [prog]
    if prog in ("__main__.py", "") or "hf_gpt2_train" in sys.argv[0]:
        return ["python", "-m", "hf_gpt2_train"]
    return ["python", sys.argv[0]]


def resume_command_hint(output_dir: str | Path, argv: list[str] | None = None) -> str:
    """The exact command that resumes this run from ``latest`` (this process's argv, resume flag replaced)."""
    args = list(sys.argv[1:] if argv is None else argv)
    out: list[str] = []
    skip = False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        if a in ("--resume_from_checkpoint", "--resume"):
            skip = i + 1 < len(args) and not args[i + 1].startswith("--")
            continue
        if a.startswith(("--resume_from_checkpoint=", "--resume=")):
            continue
        out.append(a)
    if not any(a == "--output_dir" or a.startswith("--output_dir=") for a in out):
        out += ["--output_dir", str(output_dir)]  # also when a --config names it: the same folder, explicit
    env = [f"{k}={os.environ[k]}" for k in ("ACCELERATE_USE_CPU",)
           if os.environ.get(k, "").lower() in ("1", "true", "yes")]
    return shlex.join([*env, *_launcher(), *out, "--resume_from_checkpoint", "latest"])
