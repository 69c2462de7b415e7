"""Export to Hugging Face format (model, tokenizer, model card) and push to the Hub.

Imports are lazy: the CLI imports this package to register `export`/`push`, and must not pay for
torch/transformers/huggingface_hub unless one of them runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hf_gpt2_train.hub.cli import register_cli

if TYPE_CHECKING:
    from hf_gpt2_train.hub.end import push_at_end
    from hf_gpt2_train.hub.export import default_export_dir, export_hf, is_export_dir, resolve_checkpoint
    from hf_gpt2_train.hub.push import PushResult, export_and_push_after_training, push_to_hub

_LAZY = {
    "export_hf": "export", "resolve_checkpoint": "export", "default_export_dir": "export", "is_export_dir": "export",
    "push_to_hub": "push", "export_and_push_after_training": "push", "PushResult": "push",
    "push_at_end": "end",
}

__all__ = [
    "register_cli", "export_hf", "resolve_checkpoint", "default_export_dir", "is_export_dir", "push_to_hub",
    "export_and_push_after_training", "PushResult", "push_at_end",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"hf_gpt2_train.hub.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'hf_gpt2_train.hub' has no attribute {name!r}")
