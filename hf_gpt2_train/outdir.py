"""Checks of ``--output_dir`` before a run writes anything: one line naming the fix, exit 2, nothing clobbered.

Refused: a path that is a file, a folder that cannot be created (``/proc/x``, a path through a file), one
that is read-only (a read-only mount, no permission) and a folder that already holds a run unless the run
is being resumed. Writability is proven by writing (and deleting) a probe file: permission bits mean
nothing to root, and read-only mounts only show on a write.

The main process decides (it is the only one that writes there) and the other processes of a launch
receive its verdict, so every rank stops at the same point with the same error, printed once per node.

**One folder every node sees.** A checkpoint is written by several processes into one folder (every rank its
``random_states_<rank>.pkl``, under FSDP its shards) and must be readable by every process on resume, so a
multi-node run needs ``--output_dir`` on a filesystem all nodes share. ``shared_folder_problem`` proves it
before anything is written: the main process creates a marker file with a random name, and every process looks
for it (for up to ``SHARED_WAIT_S``: network filesystems may show a new file late). A node-local folder (each
node its own disk at the same path) is refused on every node with one line, never found out at the first
resume.
"""

from __future__ import annotations

import errno
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from hf_gpt2_train.config import ConfigError

SHARED_WAIT_S = 10.0  # how long a process looks for the main process's marker before calling the folder unshared


def output_dir_problem(output_dir: Path, resume: str | None) -> str | None:
    """Why ``output_dir`` cannot take this run (one line, naming the fix), or None. May create the folder."""
    from hf_gpt2_train.fsio import probe_writable_dir

    flag = f"--output_dir {output_dir}"
    if output_dir.exists() and not output_dir.is_dir():
        return f"{flag} is a file, not a folder: choose another --output_dir (the file was not touched)"
    ckpts = output_dir / "checkpoints"
    has_run = (output_dir / "run_info.json").exists() or (ckpts.is_dir() and any(ckpts.iterdir()))
    if has_run and not resume:
        return (f"{output_dir} already holds a run: pass --resume_from_checkpoint latest to continue it, or choose "
                "another --output_dir")
    try:
        probe_writable_dir(output_dir)
    except OSError as e:
        why = {
            errno.EROFS: "is on a read-only filesystem",
            errno.EACCES: "is not writable (permission denied)",
            errno.EPERM: "is not writable (operation not permitted)",
            errno.ENOENT: "cannot be created (a parent folder cannot hold it)",
            errno.ENOTDIR: "cannot be created (a parent in the path is a file)",
            errno.ENOSPC: "cannot be written (no space left on the device)",
            errno.EDQUOT: "cannot be written (disk quota exceeded)",
        }.get(e.errno or 0, f"cannot be created or written ({e.strerror or e})")
        return f"{flag} {why}: choose a writable --output_dir"
    return None


def check_output_dir(output_dir: Path, resume: str | None, state: Any) -> None:
    """Raise ConfigError (on every process alike) when ``output_dir`` cannot take this run.

    ``state``: Accelerate's ``PartialState`` of the launch. The main process checks; with several processes
    its verdict is broadcast, so no rank walks on into a collective that the main process never joins.
    """
    problem = output_dir_problem(output_dir, resume) if state.is_main_process else None
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        problem = broadcast_object_list([problem], from_process=0)[0]
        problem = problem or shared_folder_problem(output_dir, state)
    if problem:
        raise ConfigError(problem, every_process=True)


def _sees(marker: Path, wait_s: float) -> bool:
    """Whether ``marker`` shows up within ``wait_s`` (listing the folder revalidates NFS's cached view)."""
    end = time.monotonic() + wait_s
    while True:
        try:
            if marker.name in os.listdir(marker.parent):
                return True
        except OSError:
            pass
        if time.monotonic() >= end:
            return False
        time.sleep(0.25)


def shared_folder_problem(output_dir: Path, state: Any, wait_s: float | None = None) -> str | None:
    """Why ``output_dir`` is not one folder shared by every process of the launch (one line), or None.

    Collective: every process calls it. The main process writes a marker, all look for it, the verdicts are
    gathered (so every rank returns the same answer) and the marker is removed.
    """
    from accelerate.utils import broadcast_object_list, gather_object

    marker = None
    if state.is_main_process:
        marker = output_dir / f".hf-gpt2-train-shared-{uuid.uuid4().hex}"
        marker.write_bytes(b"")
    name, main_host = broadcast_object_list([marker.name if marker else None, socket.gethostname()],
                                            from_process=0)
    seen = _sees(output_dir / name, SHARED_WAIT_S if wait_s is None else wait_s)
    blind = sorted({host for ok, host in gather_object([(seen, socket.gethostname())]) if not ok})
    if marker is not None:
        marker.unlink(missing_ok=True)
    if not blind:
        return None
    return (f"--output_dir {output_dir} is not shared: node(s) {', '.join(blind)} do not see the files the main "
            f"process (on {main_host}) writes there, and a checkpoint "
            "must be readable by every node; put --output_dir on a filesystem all nodes mount (NFS, Lustre, GPFS, ...)")
