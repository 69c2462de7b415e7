"""Device memory: what a training step adds on top of the weights and optimizer state, and the micro-batch that fits.

* ``StepMemory``: the peak number of bytes a block of code allocates above what was allocated when it started, from
  the allocator itself. CUDA: ``torch.cuda.max_memory_allocated``. CPU: torch's CPU allocator reports each
  allocation and free to the profiler with its running total (``profile_memory=True``); the peak of that total over
  the block, less its value when the block began, counts every tensor the block allocated and still held at that
  moment. Memory the block frees that was allocated before it is not subtracted (it stays counted, as on a GPU whose
  caching allocator would not reuse it for a larger request either).
* ``resolve_micro_batch``: ``--per_device_train_batch_size auto``. On CUDA (and on CPU when the process has an
  address-space limit, ``ulimit -v``, the only case where running out of host memory raises an error rather than
  waking the kernel's OOM killer), Accelerate's ``find_executable_batch_size`` tries the divisors of the per-process
  batch from the largest down; a trial is what a training step holds at its peak: the optimizer state AdamW will
  allocate at its first step (reserved as one block), and two forward+backward passes so that the second runs with
  the first's gradients alive, as an accumulation step does. Trials run on random tokens, with the RNG state
  restored afterwards and the gradients dropped: the run that follows is the run a fixed micro-batch would give.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import sys
from collections.abc import Iterator
from typing import Any

import torch

from hf_gpt2_train.config import PRESETS, Config, ConfigError, OptimConfig

logger = logging.getLogger("hf_gpt2_train")

# Share of a GPU's memory the micro-batch table may plan for: the rest is the CUDA context, the caching allocator's
# fragmentation and evaluation (docs/benchmarks.md, Memory).
USABLE_FRACTION = 0.92
NEAR_ZERO_BATCH = (1, 8)  # sequences x tokens of the reference step: its activations are ~0


class StepMemory:
    """``with StepMemory(device) as m: step()`` -> ``m.peak_bytes``: the peak allocated above the start."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self._prof: Any = None
        self._before = 0

    def __enter__(self) -> StepMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "cpu":
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            with _stderr_muted():  # kineto prints a "profiler_start" line on fd 2
                self._prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._before
        elif self._prof is not None:
            with _stderr_muted():
                self._prof.__exit__(*exc)
            if exc[0] is None:
                self.peak_bytes = _profiled_cpu_peak(self._prof)


@contextlib.contextmanager
def _stderr_muted() -> Iterator[None]:
    """File descriptor 2 to /dev/null for a moment (C++ code writes there directly, past Python's sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _profiled_cpu_peak(prof: Any) -> int | None:
    """Peak of the CPU allocator's running total over a profile, above its value at the profile's first allocation."""
    allocation = getattr(torch._C._profiler, "_ExtraFields_Allocation", None)
    if allocation is None:
        return None
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        f = e.extra_fields
        if isinstance(f, allocation) and f.device.type == "cpu":
            events.append((e.start_time_ns, f.total_allocated, f.alloc_size))
    if not events:
        return 0
    events.sort()
    start = events[0][1] - events[0][2]  # the total just before the first allocation
    return max(0, max(total for _, total, _ in events) - start)


def static_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer, device_type: str = "cuda") -> int:
    """Bytes held between steps on ``device_type``: parameters and optimizer state (grads are freed by
    zero_grad(set_to_none)). AdamW creates its state at the first step: measure after one."""
    seen: set[int] = set()
    total = 0
    tensors = list(model.parameters()) + [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    for t in tensors:
        if id(t) not in seen and t.device.type == device_type:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def largest_micro_batch(memory_gib: float, static: int, base_step: int, per_token: float, seq_len: int) -> int:
    """The largest micro-batch (sequences) with static + base_step + per_token * seq_len * b <= USABLE_FRACTION of
    ``memory_gib``; 0 when not even one fits."""
    room = USABLE_FRACTION * memory_gib * 2**30 - static - base_step
    if room <= 0 or per_token <= 0:
        return 0
    return int(room // (per_token * seq_len))


# ---------------------------------------------------------------------------------- --per_device_train_batch_size auto
def divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def search_allowed(device_type: str) -> tuple[bool, str]:
    """Whether a trial that runs out of memory raises here (and why not)."""
    if device_type == "cuda":
        return True, ""
    if device_type == "cpu":
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            return True, ""
        return False, ("running out of host memory wakes the kernel's OOM killer instead of raising an error; "
                       "set an address-space limit (ulimit -v) to let auto search on CPU")
    return False, f"no memory search on {device_type}"


def preset_micro_batch(cfg: Config) -> int:
    """The micro-batch the preset (else the dataclass default) would use: auto's answer where it cannot search."""
    return int(PRESETS.get(cfg.preset, {}).get("optim", {}).get("per_device_train_batch_size",
                                                                  OptimConfig.per_device_train_batch_size))


def _trial(batch: int, model: torch.nn.Module, accelerator: Any, optimizer: torch.optim.Optimizer, seq_len: int,
           vocab_size: int, passes: int, reserve_bytes: int) -> None:
    """What a step holds at its peak at micro-batch ``batch``: raises the allocator's out-of-memory error if it
    does not fit. The model is the unwrapped module (Accelerate's autocast kept): no collective runs, so ranks may
    try different sizes."""
    device = accelerator.device
    reserve = torch.empty(reserve_bytes, dtype=torch.uint8, device=device) if reserve_bytes else None
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, vocab_size, (batch, seq_len), device=device, generator=gen)
    try:
        for _ in range(passes):
            loss = model(input_ids=x, targets=x)
            loss.backward()
            del loss
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        optimizer.zero_grad(set_to_none=True)
        del reserve


def resolve_micro_batch(cfg: Config, accelerator: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        resumed_micro_batch: int | None) -> dict[str, Any]:
    """Set ``cfg.optim.per_device_train_batch_size`` for ``auto`` (after ``accelerator.prepare``); returns what
    run_info.json records. ``resumed_micro_batch``: the micro-batch of the checkpoint this run resumes (kept)."""
    from accelerate.utils import DistributedType, find_executable_batch_size

    o, world = cfg.optim, accelerator.num_processes
    per_process = o.total_batch_size // (o.seq_len * world)
    info: dict[str, Any] = {"requested": "auto", "per_process_sequences": per_process}
    if resumed_micro_batch is not None:
        o.per_device_train_batch_size = resumed_micro_batch
        info.update(source="checkpoint", chosen=resumed_micro_batch)
        note = cfg.fit_micro_batch(world)  # another world size may need a smaller one
        info["chosen"] = o.per_device_train_batch_size
        logger.info("per_device_train_batch_size auto: %d, the micro-batch of the checkpoint this run resumes "
                    "(pass a number to change it)%s", info["chosen"], f"; {note}" if note else "")
        return info
    allowed, why = search_allowed(accelerator.device.type)
    if not allowed:
        o.per_device_train_batch_size = preset_micro_batch(cfg)
        note = cfg.fit_micro_batch(world)
        info.update(source="preset", chosen=o.per_device_train_batch_size, reason=why)
        logger.info("per_device_train_batch_size auto on %s: %d, the %s micro-batch, without a search (%s)%s",
                    accelerator.device.type, info["chosen"], cfg.preset or "default", why, f"; {note}" if note else "")
        return info
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError("--per_device_train_batch_size auto is not supported under FSDP (its forward communicates, "
                          "so ranks cannot try sizes on their own): pass a number (docs/benchmarks.md, Memory, has "
                          "measured figures per preset)", every_process=True)
    module = accelerator.unwrap_model(model)  # DDP's forward would synchronise buffers across ranks
    params = [p for g in optimizer.param_groups for p in g["params"]]
    reserve = 0 if optimizer.state else 2 * sum(p.numel() * p.element_size() for p in params)  # AdamW moments
    candidates = divisors_descending(per_process)
    tried: list[int] = []
    position = [0]

    def next_smaller() -> int:
        position[0] += 1
        return candidates[position[0]] if position[0] < len(candidates) else 0

    def fit(batch: int) -> int:
        tried.append(batch)
        passes = 2 if per_process // batch > 1 else 1
        _trial(batch, module, accelerator, optimizer, o.seq_len, cfg.model.vocab_size, passes, reserve)
        return batch

    cuda = accelerator.device.type == "cuda"
    with torch.random.fork_rng(devices=[accelerator.device] if cuda else []):  # dropout's draws are not consumed
        try:
            # The direct form: accelerate < 1.16's decorator form drops reduce_batch_size_fn (accelerate#4160).
            found = find_executable_batch_size(fit, starting_batch_size=candidates[0],
                                               reduce_batch_size_fn=next_smaller)()
        except RuntimeError as e:
            if "No executable batch size found" not in str(e):
                raise
            found = 0
    found = _agree_min(found)
    if found < 1:
        raise ConfigError(f"--per_device_train_batch_size auto: not even 1 sequence of {o.seq_len} tokens fits on "
                          f"this {accelerator.device.type} device: use --activation_checkpointing full, a shorter "
                          "--seq_len or more processes with FSDP", every_process=True)
    if len(tried) > 1:
        torch._dynamo.reset()  # trials at several shapes made the compiled blocks dynamic; train on a static graph
    o.per_device_train_batch_size = found
    info.update(source="search", chosen=found, tried=tried, out_of_memory=[b for b in tried if b > found])
    logger.info("per_device_train_batch_size auto: %d, the largest micro-batch that fits and divides the %d "
                "sequences per process per step (tried %s; %s ran out of memory) -> %d accumulation step(s)", found,
                per_process, ", ".join(map(str, tried)), ", ".join(map(str, info["out_of_memory"])) or "none",
                cfg.grad_accum_steps(world))
    return info


def _agree_min(value: int) -> int:
    """The smallest ``value`` over all processes (each searched on its own device)."""
    from hf_gpt2_train.checkpoint.sync import cpu_group, distributed

    if not distributed():
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=cpu_group())
    return int(t.item())


def resumed_micro_batch(resume_path: Any) -> int | None:
    """The micro-batch the checkpoint at ``resume_path`` trained with (read on the main process, shared)."""
    from hf_gpt2_train.checkpoint import CheckpointInvalid, read_manifest
    from hf_gpt2_train.checkpoint.sync import broadcast_from_main

    value = None
    if resume_path is not None and _is_main():
        try:
            value = ((read_manifest(resume_path).get("config") or {}).get("optim") or {}).get(
                "per_device_train_batch_size")
        except CheckpointInvalid:
            value = None  # the manager's load reports a damaged checkpoint; auto then searches
    value = broadcast_from_main(value)
    return value if isinstance(value, int) and value > 0 else None


def _is_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def bytes_per_token(step_bytes: int, base_bytes: int, tokens: int) -> float:
    """Activation bytes per token: the step's peak less the near-zero step's, over the tokens between them."""
    return (step_bytes - base_bytes) / max(1, tokens - math.prod(NEAR_ZERO_BATCH))
