"""Errors the CLI turns into one line and an exit code (kept free of heavy imports)."""

from hf_gpt2_train.config import ConfigError


class NonFiniteLossError(RuntimeError):
    """A non-finite loss/grad norm with --on_nonfinite stop (the update itself was skipped): exit 3."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, unwritable folder, ...); earlier checkpoints are intact.

    Raised on every rank; the trainer lets it propagate so the run stops with a non-zero exit (1).
    """


__all__ = ["CheckpointSaveError", "ConfigError", "NonFiniteLossError"]
