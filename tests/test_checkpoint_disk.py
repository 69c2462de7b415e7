"""A save that hits a full disk, a file-size limit or a read-only folder: clear error, earlier checkpoints
intact and loadable, nothing half-written left behind, and saving works again once there is room.

The full disk is real: a small tmpfs mounted on OUTPUT_DIR/checkpoints (needs root) filled to the brim.
Without root the kernel's per-process file-size limit (RLIMIT_FSIZE -> EFBIG) stands in for it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hf_gpt2_train.checkpoint import CheckpointSaveError, atomic
from hf_gpt2_train.config import ModelConfig
from tests.test_checkpoint_manager import TINY, Harness


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> Path:
    """Write a file until the filesystem says ENOSPC."""
    filler = path / "filler.bin"
    chunk = b"\0" * 4096
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def _check_intact(out: Path, latest_step: int, model_cfg: ModelConfig = TINY) -> None:
    root = out / "checkpoints"
    assert not [p.name for p in root.iterdir() if p.name.startswith((".tmp", ".new-"))], "half-written leftovers"
    for name in ("latest", "latest_backup", "step_0000002", "step_0000004"):
        v = atomic.verify(root / name, hashes=True)
        assert v.ok, (name, v.reason)
    resumed = Harness(out, model_cfg)
    assert resumed.mgr.load(resumed.mgr.resolve_resume("latest"))["step"] == latest_step == resumed.state.step


@pytest.mark.skipif(not _can_mount(), reason="mounting a tmpfs needs root; the EFBIG test covers this case")
def test_disk_full_during_save(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with tmpfs(out / "checkpoints", "8m"):
        h = Harness(out, checkpoint_steps=2, keep_last=3)
        h.steps(4)
        filler = fill(out / "checkpoints")
        h.step()
        with pytest.raises(CheckpointSaveError, match="No space left on device") as e:
            h.steps(1)  # step 6 is due: the disk is full (the error of a background write surfaces at the wait)
        assert "step 6" in str(e.value) and "Earlier checkpoints are intact" in str(e.value)
        _check_intact(out, 4)
        filler.unlink()  # room again: the next save works and rotation resumes
        h.steps(2)
        assert atomic.verify(out / "checkpoints" / "latest").ok and Harness(out).mgr.load(out / "checkpoints" /
                                                                                          "latest")["step"] == 8


@pytest.mark.skipif(not _can_mount(), reason="mounting a tmpfs needs root; the EFBIG test covers this case")
def test_disk_fills_in_the_middle_of_a_save(tmp_path: Path) -> None:
    """Room for part of the save only: torch.save's zip writer says "unexpected pos", and removing the
    half-written save frees the space again; the error still names the full disk."""
    out = tmp_path / "run"
    with tmpfs(out / "checkpoints", "96m"):
        bigger = ModelConfig(**{**vars(TINY), "n_embd": 128, "n_layer": 4})  # a 10 MB checkpoint
        h = Harness(out, bigger, checkpoint_steps=2, keep_last=3)
        h.steps(4)
        filler = fill(out / "checkpoints")
        os.truncate(filler, filler.stat().st_size - 5_000_000)  # half a checkpoint of room
        h.step()
        with pytest.raises(CheckpointSaveError, match="No space left on device") as e:
            h.steps(1)
        assert "step 6" in str(e.value)
        room = os.statvfs(out / "checkpoints")
        assert room.f_bavail * room.f_frsize > 1 << 20  # the cleanup freed space: what the old check saw
        _check_intact(out, 4, bigger)


def test_file_size_limit_during_save(tmp_path: Path) -> None:
    out = tmp_path / "run"
    h = Harness(out, checkpoint_steps=2, keep_last=3)
    h.steps(5)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, hard))  # smaller than optimizer.bin
    try:
        with pytest.raises(CheckpointSaveError, match="step 6"):
            h.steps(1)  # model.safetensors, written in the background, exceeds the limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    _check_intact(out, 4)


def test_unwritable_folder_during_save(tmp_path: Path) -> None:
    out = tmp_path / "run"
    root = out / "checkpoints"
    h = Harness(out, checkpoint_steps=2, keep_last=3)
    h.steps(4)
    if os.geteuid() == 0:  # root ignores permission bits: make the folder a read-only mount instead
        if not _can_mount():
            pytest.skip("root without mount: cannot make a folder unwritable")
        r = subprocess.run(["mount", "--bind", "-o", "ro", str(root), str(root)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot bind-mount read-only here ({r.stderr.strip()})")
        undo = ["umount", "-l", str(root)]
    else:
        root.chmod(0o555)
        undo = ["chmod", "755", str(root)]
    try:
        h.step()
        with pytest.raises(CheckpointSaveError, match="Read-only file system|Permission denied"):
            h.steps(1)
    finally:
        subprocess.run(undo, check=False)
    _check_intact(out, 4)
