"""``build_optimizer``: which parameters each algorithm trains, with which hyperparameters.

``--optimizer adamw`` (default): ``torch.optim.AdamW``, weight decay on the 2-D weights only, exactly
build-nanogpt's recipe. ``--optimizer muon``: ``MuonWithAdamW`` with Muon on the transformer blocks' weight
matrices (``attn.c_attn`` as three Q/K/V blocks, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``; decay
``--muon_weight_decay``) and AdamW on the rest: the tied token embedding / lm_head and the position embedding
(decay ``--weight_decay``), biases and LayerNorms (no decay). Both are fused on CPU and CUDA, which is what
lets the update guard skip a step on the device (``found_inf``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_gpt2_train.config import Config
from hf_gpt2_train.model import BLOCK_PROJECTIONS
from hf_gpt2_train.optim.muon import MuonWithAdamW

OPTIMIZERS = ("adamw", "muon")


def muon_row_blocks(name: str, module: nn.Module) -> int | None:
    """How many row blocks of parameter ``name`` (in ``module``) Muon orthogonalises separately; None: not a Muon
    parameter. Only the block projections' weights are Muon's; c_attn is Q, K and V stacked by rows."""
    if not any(name.endswith(f".{p}.weight") for p in BLOCK_PROJECTIONS):
        return None
    # nn.Linear, torchao's Float8Linear and TransformerEngine's Linear store [out, in]; HF's Conv1D [in, out].
    if isinstance(module, Conv1D):
        raise ValueError(f"{name}: Muon needs the training layout (weight [out, in], see model.py), got Conv1D")
    return 3 if ".attn.c_attn." in name else 1


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer ``cfg.optim.optimizer`` names over ``model``'s trainable parameters (before ``prepare``)."""
    o = cfg.optim
    fused = device.type in ("cuda", "cpu")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if o.optimizer == "adamw":
        groups = [
            {"params": [p for _, p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
            {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon,
                                 fused=fused)
    muon: dict[int, list[nn.Parameter]] = {1: [], 3: []}
    decay, no_decay = [], []
    for name, p in params:
        blocks = muon_row_blocks(name, model.get_submodule(name.rpartition(".")[0]))
        if blocks is not None:
            muon[blocks].append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        *({"params": ps, "muon": True, "row_blocks": blocks, "lr": o.muon_learning_rate,
           "weight_decay": o.muon_weight_decay} for blocks, ps in muon.items()),
    ]
    return MuonWithAdamW([g for g in groups if g["params"]], lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2),
                         eps=o.adam_epsilon, momentum=o.muon_momentum, fused=fused,
                         ns_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)


def optimizer_mismatch(saved_config: dict[str, Any] | None, cfg: dict[str, Any] | None) -> str | None:
    """Why a checkpoint trained with one optimizer cannot resume under another (None: it can). Checkpoints from
    before ``--optimizer`` existed are AdamW's."""
    theirs = ((saved_config or {}).get("optim") or {}).get("optimizer", "adamw")
    ours = ((cfg or {}).get("optim") or {}).get("optimizer", "adamw")
    if theirs == ours:
        return None
    return (f"it was trained with --optimizer {theirs} (this run: {ours}); its optimizer state cannot be loaded "
            f"into the other: resume with --optimizer {theirs}, or start a new --output_dir")
