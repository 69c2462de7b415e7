"""Activation checkpointing per ``GPT2Block``: ``--activation_checkpointing none|full|selective``.

A checkpointed block keeps less for the backward pass and recomputes the rest there, from the block's input:

* ``full``: only the block's input is kept (one ``[B, T, n_embd]`` tensor per block); the whole block runs again
  in the backward pass (about one more forward of the blocks: ~1/3 more block FLOPs).
* ``selective``: torchtitan's per-op policy. The outputs of SDPA (cheap to keep, costly to recompute), of every
  other matmul (in order: ``c_attn`` kept, ``c_proj`` recomputed, ``c_fc`` kept, ``mlp.c_proj`` recomputed) and
  of fp8 amax reductions are kept; layer norms, GELU, residual adds and the other matmuls are recomputed.
* ``--activation_checkpointing_every N``: only every Nth block is checkpointed, the others keep everything.

How it composes (torchtitan's order: checkpointing, then per-block compile, then FSDP):

* The block's ``forward`` is replaced, on the instance, by one that runs the original forward under
  ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``. The module, its parameter names and its state dict
  do not change (no ``_checkpoint_wrapped_module.`` prefix), so checkpoints resume across modes.
* ``block.compile()`` (``model.setup_training_forward``) compiles ``Module._call_impl``, which calls this
  ``forward``: the checkpoint is traced inside the compiled region (dynamo turns it into a
  ``tag_activation_checkpoint`` higher-order op whose recomputation AOT autograd plans; the selective policy is
  applied there too), and SDPA inside it is still called with ``is_causal=True`` and no mask.
* Module hooks run outside ``forward``: FSDP2's unshard/reshard hooks are not replayed by the recomputation (the
  recomputation runs while FSDP2's pre-backward hook holds the block's parameters unsharded), and DDP's gradient
  hooks are on the parameters, untouched.
* The loss region (lm_head + cross-entropy) is never checkpointed: it is not a block.
* fp8: torchao's ``Float8Linear`` is an ordinary module inside the block (its ``_scaled_mm`` counts as a matmul for
  ``selective``; recomputing a dynamic-scaling cast gives the same bits). TransformerEngine keeps fp8 scaling state
  outside the tensors (amax histories under ``DelayedScaling``) that a plain recomputation would update twice and
  run outside TE's fp8 autocast; TE's own ``transformer_engine.pytorch.checkpoint`` (non-reentrant) stashes and
  restores that state, so TE blocks are checkpointed with it. TE's GEMMs are its own kernels, invisible to the
  per-op policy, so ``selective`` runs as ``full`` under TE (``apply_activation_checkpointing`` returns the warning).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective")


def _ops(*names: str) -> set[Any]:
    """The aten overloads among ``names`` that this torch build has (SDPA backends differ between versions)."""
    found = set()
    for name in names:
        packet, _, overload = name.rpartition(".")
        op = getattr(torch.ops.aten, packet, None)
        if op is not None and hasattr(op, overload):
            found.add(getattr(op, overload))
    return found


# Matmuls: nn.Linear with a bias is addmm (2-D and flattened 3-D inputs), without one mm; torchao fp8 is _scaled_mm.
MATMULS = _ops("mm.default", "addmm.default", "_scaled_mm.default")
# Always kept: attention (every SDPA backend: CUDA flash/efficient/cuDNN, CPU flash) and fp8 scaling amaxes.
ALWAYS_SAVE = _ops("_scaled_dot_product_flash_attention.default", "_scaled_dot_product_efficient_attention.default",
                   "_scaled_dot_product_cudnn_attention.default", "_scaled_dot_product_flash_attention_for_cpu.default",
                   "max.default")


def _selective_policy(counts: dict[str, int], ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Keep attention, amaxes and every other matmul (the 1st, 3rd, ...); recompute everything else. The forward
    and the recomputation count matmuls separately, so both see the same sequence and make the same choices."""
    if op in ALWAYS_SAVE:
        return CheckpointPolicy.MUST_SAVE
    if op in MATMULS:
        phase = "recompute" if ctx.is_recompute else "forward"
        counts[phase] += 1
        if counts[phase] % 2 == 1:
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def selective_context() -> tuple[Any, Any]:
    """``context_fn`` for ``checkpoint``: a fresh matmul count for each checkpointed call of a block."""
    return create_selective_checkpoint_contexts(partial(_selective_policy, defaultdict(int)))


def _te_checkpoint() -> Callable[..., Any]:
    from transformer_engine.pytorch import checkpoint as te_checkpoint

    return te_checkpoint


def checkpointed_forward(forward: Callable[..., Any], checkpoint_fn: Callable[..., Any],
                         context_fn: Callable[[], tuple[Any, Any]] | None) -> Callable[..., Any]:
    """``forward`` run under a non-reentrant checkpoint (the block's replacement ``forward``)."""
    extra = {"context_fn": context_fn} if context_fn is not None else {}

    def forward_with_checkpoint(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # evaluation and sampling: nothing to recompute
            return forward(*args, **kwargs)
        return checkpoint_fn(forward, *args, use_reentrant=False, **extra, **kwargs)

    forward_with_checkpoint.checkpointed = True  # type: ignore[attr-defined]
    return forward_with_checkpoint


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 1,
                                   transformer_engine: bool = False) -> str | None:
    """Checkpoint every ``every``-th ``GPT2Block`` of ``model.transformer.h`` in ``mode``, in place.

    Call after the precision conversion (``precision.prepare_model_for_precision``) and before
    ``setup_training_forward`` (compile) and ``accelerator.prepare`` (DDP/FSDP). ``transformer_engine``: the blocks
    hold TE modules (checkpointed with TE's own checkpoint). Returns a warning line when the mode had to change.
    """
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "none":
        return None
    warning = None
    checkpoint_fn: Callable[..., Any] = checkpoint
    context_fn = selective_context if mode == "selective" else None
    if transformer_engine:
        checkpoint_fn = _te_checkpoint()
        if context_fn is not None:
            context_fn = None
            warning = ("--activation_checkpointing selective runs as full under TransformerEngine: its fp8 GEMMs are "
                       "TE kernels the per-op policy cannot see, so it would keep only attention outputs")
    for i, block in enumerate(model.transformer.h):
        if i % every == 0 and not getattr(block.forward, "checkpointed", False):
            block.forward = checkpointed_forward(block.forward, checkpoint_fn, context_fn)
    return warning


def checkpointed_blocks(model: nn.Module) -> list[int]:
    """Indices of the blocks whose forward runs under a checkpoint (for tests and run_info)."""
    return [i for i, b in enumerate(model.transformer.h) if getattr(b.forward, "checkpointed", False)]
