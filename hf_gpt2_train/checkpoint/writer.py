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

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


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

    def submit(self, step: int, job: Callable[[], None]) -> None:
        """Start ``job`` (the write of the save of ``step``) in the background; call ``wait`` first."""
        if self._thread is not None:
            raise RuntimeError("a checkpoint write is still in flight: wait() for it before the next one")
        self._step, self._error, self._elapsed = step, None, 0.0
        self._thread = threading.Thread(target=self._run, args=(job,), name=f"{self.name}-step{step}", daemon=False)
        self._thread.start()

    def _run(self, job: Callable[[], None]) -> None:
        t0 = time.perf_counter()
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
