"""Errors the CLI turns into one line and an exit code (kept free of heavy imports).

Exit codes of ``hf-gpt2-train train``: 0 done (or stopped by a signal after saving ``latest``); 1 a checkpoint
could not be saved or the end-of-run push failed; 2 bad input; 3 non-finite loss with ``--on_nonfinite stop``;
4 a loss spike persisted after ``--max_rollbacks`` rollbacks; 5 the hang watchdog found no step completing
within ``--hang_timeout_minutes`` (stacks in OUTPUT_DIR/hang/); 6 another process of a multi-process run was lost
(its node died or the network failed: ``resilience/peers.py``); 130 a second SIGINT.
"""

from hf_gpt2_train.config import ConfigError

EXIT_NONFINITE = 3
EXIT_SPIKE = 4
EXIT_HANG = 5
EXIT_PEER_LOST = 6


class NonFiniteLossError(RuntimeError):
    """A non-finite loss/grad norm with --on_nonfinite stop (the update itself was skipped): exit 3."""


class SpikeRollbackError(RuntimeError):
    """A sustained loss spike after the allowed rollbacks (--max_rollbacks): exit 4."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, unwritable folder, ...); earlier checkpoints are intact.

    Raised on every rank; the trainer lets it propagate so the run stops with a non-zero exit (1).
    """


__all__ = ["EXIT_HANG", "EXIT_NONFINITE", "EXIT_PEER_LOST", "EXIT_SPIKE", "CheckpointSaveError", "ConfigError", "NonFiniteLossError",
           "SpikeRollbackError"]
