"""How a process that ran a process group ends: everything a normal exit does first, then no interpreter teardown.

Why: torch's gloo backend (seen with torch 2.13 on CPU) releases a finished collective's work object on one of
its worker threads, and that object holds tensors whose Python side needs the GIL to be released. When the
release comes after the main thread has begun the interpreter's finalization, Python ends the worker thread
inside a ``noexcept`` destructor and the process aborts ("terminate called without an active exception",
SIGABRT): torchrun then reports a failed run after the work succeeded. ``destroy_process_group()`` does not
prevent it (a DDP model keeps the group, and its threads, alive). Measured here (2 processes, Accelerate-prepared DDP
steps and collectives, then the end of the script): 2 aborts in 25 runs, 14 in 37 with ``destroy_process_group()``
last, none in 72 ending with ``leave()`` (docs/clusters.md, "How each process ends").

So such a process leaves the way finalization begins -- non-daemon threads joined (an in-flight checkpoint write
finishes), ``atexit`` handlers run (log files flushed and closed, ``weakref.finalize`` callbacks, multiprocessing
children) -- then flushes its standard streams and ends with ``os._exit`` before any worker thread can meet a
finalizing interpreter. A process that never had a process group exits normally.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading

from hf_gpt2_train import launch_world_size


def ran_process_group() -> bool:
    """True in a process of a multi-process launch (torchrun, accelerate launch) or with a group up."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available():
        return False
    return dist.is_initialized() or launch_world_size() > 1


def leave(code: int) -> None:
    """End the process with ``code``: normally (``sys.exit``) unless it ran a process group (see the module)."""
    if not ran_process_group():
        sys.exit(code)
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said on it
            pass
    os._exit(code)
