"""Tiered, crash-safe checkpoints with exact resume, and graceful shutdown.

* ``CheckpointManager``, ``CheckpointSaveError`` (manager.py): which tiers are due, saves, resume with fallback.
* ``snapshot.py``: what a save captures on the loop's thread (small files, host copy of the state; FSDP2
  layouts) and how it is written with Accelerate's writers; ``writer.py``: the background writer thread.
* ``tiers.py``: sealing a save and putting it in place as its tiers (hard links), rotation.
* ``atomic.py``: the on-disk protocol (temp folder, fsync, manifest with sizes and checksums, hard-linked tiers).
* ``GracefulShutdown``, ``resume_command_hint`` (shutdown.py): SIGINT/SIGTERM/SIGUSR1 handling.
* ``register_cli`` (cli.py): ``hf-gpt2-train checkpoints list|verify``.

The manager and shutdown modules (which need torch) load on first use, so ``checkpoints list`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from hf_gpt2_train.checkpoint.atomic import CheckpointInvalid, Verification, read_manifest, verify
from hf_gpt2_train.checkpoint.cli import register_cli
from hf_gpt2_train.errors import CheckpointSaveError

_LAZY = {
    "CheckpointManager": "manager",
    "GracefulShutdown": "shutdown",
    "resume_command_hint": "shutdown",
}

__all__ = ["CheckpointInvalid", "CheckpointSaveError", "Verification", "read_manifest", "register_cli", "verify", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"hf_gpt2_train.checkpoint.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'hf_gpt2_train.checkpoint' has no attribute {name!r}")
