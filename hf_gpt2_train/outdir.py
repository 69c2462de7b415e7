"""Checks of ``--output_dir`` before a run writes anything: one line naming the fix, exit 2, nothing clobbered.

Refused: a path that is a file, a folder that cannot be created (``/proc/x``, a path through a file), one
that is read-only (a read-only mount, no permission) and a folder that already holds a run unless the run
is being resumed. Writability is proven by writing (and deleting) a probe file: permission bits mean
nothing to root, and read-only mounts only show on a write.

The main process decides (it is the only one that writes there) and the other processes of a launch
receive its verdict, so every rank stops at the same point with the same error, printed once.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

from hf_gpt2_train.config import ConfigError


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
    if problem:
        raise ConfigError(problem, every_process=True)
