"""Validation loss over a fixed set of batches, split across ranks and reduced."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hf_gpt2_train.evaluate.common import eval_mode
from hf_gpt2_train.model import lm_logits, lm_loss


def val_loss(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], accelerator: Any,
             vocab_size: int) -> float:
    """Mean next-token loss over every target token of every rank's ``batches`` (the same batches each time).

    Each rank passes its own fixed batches (``hf_gpt2_train.data.loader`` gives every rank the same
    number); token-loss sums and token counts are summed across ranks, so the result is the mean over
    all val tokens. Runs in eval mode under ``torch.no_grad`` and ``accelerator.autocast()`` and restores
    the model's previous mode. Losses stay on the device until the single reduction at the end: one host
    sync per evaluation, not one per batch.
    """
    dev = accelerator.device
    # float64 so that summing many per-token losses is exact enough to compare across world sizes
    totals = torch.zeros(2, dtype=torch.float64, device=dev)
    with eval_mode(model), torch.no_grad(), accelerator.autocast():
        for x, y in batches:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            logits = lm_logits(model, x, vocab_size)
            totals[0] += lm_loss(logits, y, reduction="sum").double()
            totals[1] += y.numel()
    totals = accelerator.reduce(totals, reduction="sum")
    if totals[1].item() == 0:
        return float("nan")
    return (totals[0] / totals[1]).item()
