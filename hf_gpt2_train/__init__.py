"""hf-gpt2-train: GPT-2 pretraining on HuggingFace Accelerate."""

import logging as _logging
import os as _os

__version__ = "0.1.0"


def is_launch_rank_0() -> bool:
    """Rank 0 of a torchrun/accelerate launch, or a single process: read from the environment, so it holds
    before any process group exists (a config error, a token warning, the end-of-run push)."""
    return int(_os.environ.get("RANK", "0")) == 0


def launch_world_size() -> int:
    """Processes of this torchrun/accelerate launch (1 for a single process), from the environment like
    ``is_launch_rank_0``: it holds before a process group exists and after it is destroyed."""
    return int(_os.environ.get("WORLD_SIZE", "1") or 1)


def package_versions() -> dict[str, str]:
    """The versions a run records (run_info.json, manifests, the model card)."""
    import platform

    import accelerate
    import torch
    import transformers

    return {"hf_gpt2_train": __version__, "torch": torch.__version__, "accelerate": accelerate.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}

# transformers imports torchao when installed; on machines without its CUDA kernels torchao logs a
# "Failed to load ..._C_*.so" warning per kernel file and torch's pytree logs deprecation notes. They are
# harmless (we use torchao's Python float8 path) and would bury our own one-line errors.
_logging.getLogger("torchao").setLevel(_logging.ERROR)
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)
