"""A process of a multi-process run ends through process_exit.leave: what a normal exit does, then no teardown."""

from __future__ import annotations

import os
import subprocess
import sys

# A process that ran (here: would have run) a process group. At the interpreter's teardown, the object below
# prints; in a real run that is the moment a gloo worker thread releasing a collective's tensors aborts the
# process. leave() must do everything before that moment (join the writer thread, run atexit, flush the
# buffered stdout of a pipe) and never reach it.
SCRIPT = r"""
import atexit, sys, threading, time
import torch.distributed
from hf_gpt2_train.process_exit import leave, ran_process_group

class Teardown:
    def __del__(self, write=sys.stdout.write):
        write("teardown ran\n")

marker = Teardown()
writer = threading.Thread(target=lambda: (time.sleep(0.3), print("non-daemon thread finished")))  # e.g. a save
writer.start()
atexit.register(print, "atexit ran")
print(f"main done, process group: {ran_process_group()}")
leave(7)
print("not reached")
"""


def _run(world_size: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    if world_size is not None:
        env["WORLD_SIZE"] = world_size
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)


def test_a_multi_process_worker_leaves_without_the_interpreter_teardown() -> None:
    proc = _run("2")
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout.splitlines() == ["main done, process group: True", "non-daemon thread finished",
                                        "atexit ran"], proc.stdout
    assert proc.stderr == ""


def test_a_single_process_exits_normally() -> None:
    proc = _run(None)
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout.splitlines() == ["main done, process group: False", "non-daemon thread finished",
                                        "atexit ran", "teardown ran"], proc.stdout
