"""Tiny cross-rank agreements for checkpointing and shutdown, on a CPU (gloo) process group.

The training process group may be NCCL; reading an NCCL result back to the host would synchronise the GPU
stream every step. A flag all-reduced on a gloo group over CPU tensors costs microseconds and never waits
for the GPU. Single-process runs do no communication at all.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_group: Any = None


def distributed() -> bool:
    """True in a multi-process run with an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def cpu_group() -> Any:
    """The gloo group used for agreement (created once; a collective, so every rank reaches it together)."""
    global _group
    if _group is None:
        if dist.get_backend() == "gloo":
            _group = dist.group.WORLD
        else:  # the same timeout as the training group (--collective_timeout_minutes), not gloo's default
            from datetime import timedelta

            from hf_gpt2_train.resilience.watchdog import collective_timeout_in_effect

            seconds = collective_timeout_in_effect()
            _group = dist.new_group(backend="gloo", timeout=timedelta(seconds=seconds) if seconds else None)
    return _group


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on at least one (a barrier too)."""
    if not distributed():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=cpu_group())
    return bool(t.item())


def broadcast_from_main(obj: Any) -> Any:
    """The main process's ``obj`` on every rank (a picklable object)."""
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=cpu_group())
    return box[0]


class LaggedAnyFlag:
    """Agree on "did any rank raise this flag?" without blocking the training step.

    Each ``update(local)`` starts an asynchronous MAX all-reduce of the local flag and returns the agreed
    value of the *previous* call, whose reduction finished in the background during a whole training step.
    Every rank calls ``update`` the same number of times, so every rank sees the same answer at the same
    call (one call later than a synchronous reduction would).
    """

    def __init__(self) -> None:
        self._work: Any = None
        self._tensor: torch.Tensor | None = None

    def collect(self) -> bool:
        """The agreed value of the reduction started by the previous ``start`` (False before the first)."""
        if self._work is None:
            return False
        self._work.wait()
        self._work = None
        return bool(self._tensor.item())  # type: ignore[union-attr]

    def start(self, local: bool) -> None:
        """Start reducing this rank's flag in the background."""
        self._tensor = torch.tensor([1 if local else 0], dtype=torch.int32)
        self._work = dist.all_reduce(self._tensor, op=dist.ReduceOp.MAX, group=cpu_group(), async_op=True)

    def update(self, local: bool) -> bool:
        """``collect()`` then ``start(local)``; single-process runs get ``local`` back at once."""
        if not distributed():
            return local
        agreed = self.collect()
        self.start(local)
        return agreed

    def drain(self) -> None:
        """Wait for an outstanding reduction (before the process group is destroyed)."""
        if self._work is not None:
            self._work.wait()
            self._work = None
