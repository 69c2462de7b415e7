"""The background writer: one save at a time is written, fsync'd, hashed and put in place off the loop's thread.

The design follows torchtitan's asynchronous checkpointing: the loop stages the state into host memory and
hands it over; the next save first waits for the one in flight (so host buffers are reused safely and at
most one save's state is held); the last save of a run and a save on a stop signal are waited for before
the process exits. The thread is not a daemon, so even an exception that ends the run lets the write in
flight finish (a kill -9 leaves a ``.tmp-save`` folder that ``atomic.recover`` removes; the previous
checkpoint stays valid). A failure is kept and reported by ``wait`` - the manager turns it into
``CheckpointSaveError`` at the next save or at the end of the run.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

WRITER_NICE = 19  # a background write yields the cores to training when both want them


def choose_background_saves(requested: bool | None, device_type: str) -> tuple[bool, str]:
    """Whether saves are written in the background, and why (for the log and run_info.json).

    ``requested``: ``--async_checkpoint`` (None: by device). What is left of a save after ``direct.py`` is CPU
    work (0.90 s of a gpt2 save's 1.14 s on the 2-core VM): a background write only pays where training leaves
    host cores idle, as on a GPU, where the step runs on the device (measured with one training thread and a
    spare core: 0.73x a synchronous save's cost). Training on CPU keeps every core busy: there the background
    write took its CPU time from the steps and cost the run no less than a synchronous save (docs/benchmarks.md,
    Checkpoint I/O, 2026-12-04).
    """
    if requested is not None:
        return requested, f"{'asynchronous' if requested else 'synchronous'} (--async_checkpoint " \
                          f"{str(requested).lower()})"
    if device_type == "cpu":
        return False, ("synchronous: training on CPU keeps every core busy, so a background write would slow the "
                       "steps as much as it saves (--async_checkpoint true to write in the background anyway)")
    return True, (f"asynchronous: the steps run on the {device_type} device, the writer on host cores they leave idle "
                  "(--async_checkpoint false to write synchronously)")


def yield_cores() -> None:
    """Lower the calling thread to the lowest CPU priority (Linux priorities are per thread; the threads it starts
    inherit it). Best effort: elsewhere, or where it is refused, the thread keeps its priority."""
    if sys.platform != "linux":
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
    except OSError:
        pass


@dataclass
class Finished:
    """What ``wait`` returns for the save that was in flight."""

    step: int | None = None  # None: nothing was in flight
    error: BaseException | None = None
    waited_s: float = 0.0
    write_s: float = 0.0  # how long the background write itself took


class BackgroundWriter:
    """Runs one write job at a time on its own thread."""

    def __init__(self, name: str = "checkpoint-writer"):
        self.name = name
        self._thread: threading.Thread | None = None
        self._step: int | None = None
        self._error: BaseException | None = None
        self._elapsed = 0.0

    @property
    def busy(self) -> bool:
        """A job was submitted and not yet collected by ``wait`` (it may already have finished)."""
        return self._thread is not None

    @property
    def running(self) -> bool:
        """A job is being written right now (submitted and not finished)."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, step: int, job: Callable[[], None], background: bool = True) -> None:
        """Start ``job`` (the write of the save of ``step``) on the writer thread; call ``wait`` first.
        ``background``: training goes on meanwhile, so the thread runs at the lowest priority (``yield_cores``);
        a save the loop waits for keeps the normal priority."""
        if self._thread is not None:
            raise RuntimeError("a checkpoint write is still in flight: wait() for it before the next one")
        self._step, self._error, self._elapsed = step, None, 0.0
        self._thread = threading.Thread(target=self._run, args=(job, background), name=f"{self.name}-step{step}",
                                        daemon=False)
        self._thread.start()

    def _run(self, job: Callable[[], None], background: bool) -> None:
        t0 = time.perf_counter()
        if background:
            yield_cores()
        try:
            job()
        except BaseException as e:  # kept for the loop: a failed background write must never pass silently
            self._error = e
        finally:
            self._elapsed = time.perf_counter() - t0

    def wait(self) -> Finished:
        """Block until the job in flight (if any) has finished; its step, error and how long we waited."""
        if self._thread is None:
            return Finished()
        t0 = time.perf_counter()
        self._thread.join()
        done = Finished(self._step, self._error, time.perf_counter() - t0, self._elapsed)
        self._thread, self._step, self._error = None, None, None
        return done
