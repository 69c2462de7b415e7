"""Durable file writes: the one place the project does temp file + fsync + rename + fsync of the folder.

A file written with :func:`write_bytes_atomic` (or the text/JSON/stream variants) is, after a crash or a
power cut, either the complete new content or whatever was there before, never a torn mix: the bytes go
to a temp file in the same folder, the file is fsync'd, renamed onto the target (atomic on POSIX), and the
folder is fsync'd so the rename itself is durable. Kept free of heavy imports (the CLI loads it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger("hf_gpt2_train.fsio")


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a rename is only durable once its parent directory is fsync'd)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):  # directories cannot be opened on Windows: nothing to do
        return
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems refuse fsync on directories (EINVAL); files must still succeed.
        if not path.is_dir():
            raise
        logger.debug("fsync of directory %s not supported: %s", path, e)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder: makes the creations, renames and deletions inside it durable."""
    fsync_path(path)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; on a clean exit it is fsync'd and renamed onto ``path``.

    On an exception the temp file is removed and ``path`` is left as it was. ``mode`` is ``"wb"`` or ``"w"``.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_file_mode())  # mkstemp makes 0600 files; give the user's normal permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` durably and atomically."""
    with atomic_writer(path, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` durably and atomically."""
    with atomic_writer(path, "w", encoding=encoding) as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON (non-JSON values through ``str``) to ``path`` durably and atomically."""
    write_text_atomic(path, json.dumps(obj, indent=indent, default=str) + "\n")


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def probe_writable_dir(path: str | os.PathLike) -> None:
    """Create ``path`` (with parents) if needed and prove it accepts files: write, fsync and delete one.

    Raises ``OSError`` (with ``errno``/``strerror``) when it is a file, cannot be created or is read-only.
    A real write is the only reliable test: permission bits say nothing for root, ``os.access`` misses
    quotas and some network filesystems.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".hf-gpt2-train-write-test-", dir=path)
    try:
        os.write(fd, b"ok")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(tmp)
