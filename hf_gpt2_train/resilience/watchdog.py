"""Hang watchdog and collective timeouts.

**Watchdog.** A daemon thread per process watches the training loop's heartbeat (``beat()`` after every
step, including its eval/save). When no step has completed for the timeout, it writes every thread's Python
stack (``faulthandler``) to ``OUTPUT_DIR/hang/rank<R>_pid<P>.txt``, logs one line and exits the process
with code 5 (``errors.EXIT_HANG``), so that torchrun ``--max_restarts`` or a Slurm requeue restarts the run
from its latest checkpoint. A rank blocked in a collective waits with the GIL released, so its watchdog
runs; every live rank of a hung run dumps its own stacks (the hung one too, if it is only slow).

The timeout is ``--hang_timeout_minutes`` or, by default, derived from what the run measures: the larger
of 30 minutes, 20x the median step and 1.5x the slowest step seen (a step includes its eval and save).
It is armed by the first completed step (start-up, compilation and a resume's load are covered by the
collective timeout). As a backstop for a hang that holds the GIL, ``faulthandler.dump_traceback_later``
dumps to stderr and exits (status 1) at twice the timeout.

**Collective timeouts.** ``collective_kwargs`` builds the ``InitProcessGroupKwargs`` the trainer passes when
it creates the process group: ``--collective_timeout_minutes`` (default 60) instead of torch's defaults
(10 min NCCL, 30 min gloo), longer than a save, an eval or the end-of-run push, and longer than the
watchdog's timeout so the watchdog (with stacks) fires first.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import statistics
import sys
import threading
import time
from collections import deque
from datetime import timedelta
from pathlib import Path
from typing import Any

from hf_gpt2_train.config import ResilienceConfig
from hf_gpt2_train.errors import EXIT_HANG

log = logging.getLogger("hf_gpt2_train")

MIN_AUTO_TIMEOUT_S = 30 * 60
STEPS_PER_TIMEOUT = 20
SLOWEST_MARGIN = 1.5


def collective_kwargs(cfg: ResilienceConfig) -> Any:
    """``InitProcessGroupKwargs`` with the configured collective timeout (pass to PartialState and Accelerator)."""
    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=timedelta(minutes=cfg.collective_timeout_minutes))


def collective_timeout_in_effect() -> float | None:
    """Seconds of the default process group's timeout as its backend holds it (None without a group)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    pg = dist.group.WORLD
    for dev in ("cuda", "cpu"):
        try:
            return pg._get_backend(torch.device(dev)).options._timeout.total_seconds()
        except (RuntimeError, AttributeError):
            continue
    return None


class HangWatchdog:
    """Context manager around the training loop; ``beat(step)`` after every step (see the module docstring)."""

    def __init__(self, cfg: ResilienceConfig, output_dir: str | Path, rank: int, poll_s: float | None = None):
        self.fixed_s = cfg.hang_timeout_minutes * 60 if cfg.hang_timeout_minutes > 0 else None
        self.enabled = cfg.hang_timeout_minutes >= 0
        self.collective_s = cfg.collective_timeout_minutes * 60
        self.hang_dir = Path(output_dir) / "hang"
        self.rank = rank
        self._poll_s = poll_s
        self._intervals: deque[float] = deque(maxlen=256)
        self._slowest = 0.0
        self._last: float | None = None
        self._step = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backstop_armed_at = 0.0

    # ------------------------------------------------------------------------------------- the loop side
    def __enter__(self) -> HangWatchdog:
        if self.enabled:
            self._stop.clear()
            self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.enabled:
            faulthandler.cancel_dump_traceback_later()
        self._last = None

    def beat(self, step: int) -> None:
        """A step (with its eval/save) completed: restart the clock. Cheap: no locks, no I/O."""
        now = time.monotonic()
        if self._last is not None:
            dt = now - self._last
            self._intervals.append(dt)
            self._slowest = max(self._slowest, dt)
        self._last, self._step = now, step
        if self.enabled and now - self._backstop_armed_at > self.timeout_s() / 4:
            # The C-level backstop needs no GIL; re-armed every quarter timeout (it starts a thread).
            try:
                faulthandler.dump_traceback_later(2 * self.timeout_s(), exit=True, file=sys.stderr)
            except (AttributeError, OSError, ValueError):  # a stderr without a file descriptor: no backstop
                pass
            self._backstop_armed_at = now

    def timeout_s(self) -> float:
        """The current timeout in seconds (fixed, or derived from the steps measured so far)."""
        if self.fixed_s is not None:
            return self.fixed_s
        median = statistics.median(self._intervals) if self._intervals else 0.0
        return max(MIN_AUTO_TIMEOUT_S, STEPS_PER_TIMEOUT * median, SLOWEST_MARGIN * self._slowest)

    # ---------------------------------------------------------------------------------- the watch thread
    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s or min(10.0, max(0.5, self.timeout_s() / 20))):
            last = self._last
            if last is None:
                continue  # not armed before the first step
            waited = time.monotonic() - last
            if waited > self.timeout_s():
                self._fire(waited)

    def _fire(self, waited: float) -> None:
        timeout = self.timeout_s()
        path = self.hang_dir / f"rank{self.rank}_pid{os.getpid()}.txt"
        try:
            self.hang_dir.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.write(f"hang watchdog: no training step completed for {waited:.0f}s (timeout {timeout:.0f}s); "
                        f"last completed step {self._step}\nrank {self.rank}, pid {os.getpid()}, host "
                        f"{socket.gethostname()}, {time.strftime('%Y-%m-%d %H:%M:%S')}\ncollective timeout in "
                        f"effect: {collective_timeout_in_effect()} s\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as e:
            path = Path(f"<not written: {e}>")
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        def say() -> None:
            log.error("hang watchdog: no training step completed for %.0f s after step %d (timeout %.0f s); stacks "
                      "of every thread in %s; exiting with code %d so a supervisor restarts the run (resume with "
                      "--resume_from_checkpoint auto)", waited, self._step, timeout, path, EXIT_HANG)
            for h in [*log.handlers, *logging.getLogger().handlers]:
                h.flush()
            sys.stdout.flush()
            sys.stderr.flush()

        # The hung thread may hold a logging lock or sit in a write to a full pipe: never wait long to say it.
        speaker = threading.Thread(target=say, name="hang-watchdog-log", daemon=True)
        speaker.start()
        speaker.join(timeout=10)
        os._exit(EXIT_HANG)
