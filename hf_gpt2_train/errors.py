"""Errors the CLI turns into one line and an exit code (kept free of heavy imports)."""

from hf_gpt2_train.config import ConfigError


class NonFiniteLossError(RuntimeError):
    """A non-finite loss/grad norm with --on_nonfinite stop (the update itself was skipped): exit 3."""


__all__ = ["ConfigError", "NonFiniteLossError"]
