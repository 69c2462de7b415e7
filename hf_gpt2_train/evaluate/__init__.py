"""Evaluation: validation loss, HellaSwag, generated samples, the trainer's ``Evaluator`` and ``eval``.

Heavy modules (torch, transformers) load on first use, so building the CLI parser stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from hf_gpt2_train.evaluate.cli import register_cli

_LAZY = {
    "val_loss": "hf_gpt2_train.evaluate.val",
    "load_hellaswag": "hf_gpt2_train.evaluate.hellaswag",
    "hellaswag_eval": "hf_gpt2_train.evaluate.hellaswag",
    "render_example": "hf_gpt2_train.evaluate.hellaswag",
    "score_examples": "hf_gpt2_train.evaluate.hellaswag",
    "generate_samples": "hf_gpt2_train.evaluate.samples",
    "sample_token_ids": "hf_gpt2_train.evaluate.samples",
    "Evaluator": "hf_gpt2_train.evaluate.evaluator",
}

__all__ = ["register_cli", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
