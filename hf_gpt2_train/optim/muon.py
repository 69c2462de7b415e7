"""Muon on the transformer blocks' weight matrices, AdamW on everything else, as one ``torch.optim.Optimizer``.

Muon (Keller Jordan, 2024; modded-nanogpt) keeps a Nesterov momentum of each matrix's gradient and applies
its orthogonalisation: five Newton-Schulz iterations push every singular value of the momentum towards 1, so
the update moves all directions of the matrix at the same rate. The update of a ``fan_out x fan_in`` matrix is
scaled by ``sqrt(max(1, fan_out / fan_in))`` (modded-nanogpt's scaling: the same spectral-norm step whatever
the shape), so the fused QKV projection (``[3d, d]`` in the training layout) is treated as three ``[d, d]``
matrices, Q, K and V, orthogonalised separately as the speedrun does (``row_blocks=3``), and ``mlp.c_fc``
(``[4d, d]``) gets the factor 2 its *output* dimension calls for: the scaling reads the ``nn.Linear``
orientation (rows = outputs), which is why ``build_optimizer`` refuses HF's transposed ``Conv1D``.
Decoupled weight decay: ``w -= lr * weight_decay * w`` before the update.

Why not ``torch.optim.Muon`` (torch >= 2.9)? Its Newton-Schulz runs in bfloat16 unconditionally (about 30x
slower than float32 on CPUs without bf16 instructions, like the one CI runs on), it updates its momentum in
place with no ``found_inf`` (the update guard must skip a step on the device without a host sync, leaving
the momentum untouched), it orthogonalises a parameter as one matrix (no per-Q/K/V blocks) and, under FSDP2,
it would orthogonalise each rank's shard instead of the matrix. Its functional pieces share the bf16 cast.
What is reused instead: torch's own functional AdamW (``torch.optim.adamw.adamw``, fused, with the same state
layout as ``torch.optim.AdamW``) for the AdamW groups.

Guarantees the trainer relies on:

* ``found_inf`` (set by the update guard, or by a GradScaler: ``_step_supports_amp_scaling``) skips the whole
  update on the device: weights, Muon momentum buffers, AdamW moments and step counts stay bit for bit as they
  were, with no host synchronisation.
* FSDP2 (DTensor parameters): the momentum buffers stay sharded like their parameters; the Nesterov update is
  all-gathered, orthogonalised as the full matrix on every rank and each rank keeps its own shard. Every rank
  takes the same decisions (the skip flag is global), so the collectives always match.
* DDP: every rank holds the full, all-reduced gradient and orthogonalises every matrix itself; the result is
  the same on every rank.
* Deterministic: on CPU in float32 a resumed run repeats an uninterrupted one bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate
from torch.optim.adamw import adamw

# Keller Jordan's quintic Newton-Schulz coefficients and step count (modded-nanogpt; torch.optim.Muon's defaults).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


def orthogonalise(update: Tensor, row_blocks: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    """Newton-Schulz orthogonalisation of each of the ``row_blocks`` row blocks of the 2-D ``update`` (Q, K and V
    of a fused ``[3d, d]`` projection: ``row_blocks=3``), computed in ``dtype``, each block scaled by
    ``sqrt(max(1, rows / cols))``; returned in ``update``'s dtype and shape."""
    rows, cols = update.shape
    x = update.reshape(row_blocks, rows // row_blocks, cols).to(dtype)
    wide = x.size(-2) <= x.size(-1)
    if not wide:
        x = x.mT  # iterate on the smaller Gram matrix
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + NS_EPS)  # spectral norm <= Frobenius norm <= 1
    a, b, c = NS_COEFFICIENTS
    for _ in range(NS_STEPS):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    if not wide:
        x = x.mT
    scale = max(1.0, (rows // row_blocks) / cols) ** 0.5
    return (x * scale).reshape(rows, cols).to(update.dtype)


def _local(t: Tensor) -> Tensor:
    """The tensor this rank holds (an FSDP2 shard for a DTensor; under no_grad the same storage)."""
    return t.to_local() if isinstance(t, DTensor) else t


def _full(local: Tensor, like: Tensor) -> Tensor:
    """The whole matrix of which ``local`` is this rank's shard, laid out like the parameter ``like`` (all-gather)."""
    if not isinstance(like, DTensor):
        return local
    shard = DTensor.from_local(local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())
    return shard.full_tensor()


def _shard(full: Tensor, like: Tensor) -> Tensor:
    """This rank's shard of ``full`` in the layout of ``like`` (a local slice: every rank holds ``full``)."""
    if not isinstance(like, DTensor):
        return full
    replicated = DTensor.from_local(full, like.device_mesh, [Replicate()] * like.device_mesh.ndim)
    return replicated.redistribute(like.device_mesh, like.placements).to_local()


class MuonWithAdamW(torch.optim.Optimizer):
    """Param groups with ``muon=True`` (2-D weights; ``row_blocks`` row blocks orthogonalised separately) take
    Muon steps with ``lr``, ``momentum``, ``nesterov`` and ``weight_decay``; the others are AdamW groups (``lr``,
    ``betas``, ``eps``, ``weight_decay``), stepped by torch's functional AdamW. See the module docstring."""

    def __init__(self, params: list[dict[str, Any]], lr: float = 6e-4, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.95, nesterov: bool = True,
                 fused: bool = False, ns_dtype: torch.dtype = torch.float32):
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "momentum": momentum,
                    "nesterov": nesterov, "muon": False, "row_blocks": 1}
        super().__init__(params, defaults)
        self.fused = fused
        self.ns_dtype = ns_dtype
        """Newton-Schulz precision: bfloat16 on GPUs (as modded-nanogpt), float32 on CPUs (no bf16 units)."""
        # Like fused AdamW: a GradScaler hands us grad_scale/found_inf instead of checking for infs on the host.
        self._step_supports_amp_scaling = fused
        for group in self.param_groups:
            if group["muon"]:
                for p in group["params"]:
                    if p.dim() != 2 or p.shape[0] % group["row_blocks"]:
                        raise ValueError(f"Muon needs 2-D weights with rows divisible by {group['row_blocks']}, "
                                         f"got {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        for group in self.param_groups:
            if group["muon"]:
                self._muon_group(group, grad_scale, found_inf)
            else:
                self._adamw_group(group, grad_scale, found_inf)
        return loss

    def _adamw_group(self, group: dict[str, Any], grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:  # torch.optim.AdamW's state layout (fused: the step count lives on the device)
                device = p.device if self.fused else "cpu"
                state["step"] = torch.zeros((), dtype=torch.float32, device=device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=self.fused, grad_scale=grad_scale,
              found_inf=found_inf, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

    def _muon_group(self, group: dict[str, Any], grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf, weight, grad = _local(state["momentum_buffer"]), _local(p), _local(p.grad)
            if grad_scale is not None:
                grad = grad / grad_scale
            new_buf = buf.lerp(grad, 1 - mu)
            update = grad.lerp(new_buf, mu) if group["nesterov"] else new_buf
            # Orthogonalised as the whole matrix (an FSDP2 shard is only some of its rows).
            ortho = _shard(orthogonalise(_full(update, p), group["row_blocks"], self.ns_dtype), p)
            new_weight = weight * (1 - lr * wd) - lr * ortho
            if found_inf is None:
                buf.copy_(new_buf)
                weight.copy_(new_weight)
            else:  # a skipped step: both keep their values (a select, so a NaN update cannot leak in)
                skip = found_inf.reshape(()).to(weight.device) > 0
                buf.copy_(torch.where(skip, buf, new_buf))
                weight.copy_(torch.where(skip, weight, new_weight))
