"""hf-gpt2-train: GPT-2 pretraining on HuggingFace Accelerate."""

import logging as _logging

__version__ = "0.1.0"

# transformers imports torchao when installed; on machines without its CUDA kernels torchao logs a
# "Failed to load ..._C_*.so" warning per kernel file and torch's pytree logs deprecation notes. They are
# harmless (we use torchao's Python float8 path) and would bury our own one-line errors.
_logging.getLogger("torchao").setLevel(_logging.ERROR)
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)
