"""Helpers shared by the evaluation modules."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

from torch import nn


def base_model(model: nn.Module) -> nn.Module:
    """The bare model under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers.

    Used to read the model's config (``n_positions``); forwards still go through ``model`` itself so a
    wrapper that communicates in its forward sees every call.
    """
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Switch to eval mode (no dropout) and restore the previous mode afterwards, even on error."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def supports_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward can skip the lm_head on leading positions (transformers >= 4.50)."""
    return "logits_to_keep" in inspect.signature(base_model(model).forward).parameters
