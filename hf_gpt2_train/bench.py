"""`hf-gpt2-train bench`: throughput, MFU, step time and peak memory of our real training step, against a plain
PyTorch loop over the same model, batches, fused AdamW, accumulation and clipping (no Accelerate), in one run.

For each precision both loops are built and run ``--warmup`` untimed steps each (compile, allocator, caches);
then they run in alternating timed segments of ``--steps`` optimizer steps (ours, plain, plain, ours, ...: each
repeat flips the order, so slow drift of a shared or throttling machine hits both alike; with ``--steps 1``, the
CPU default, the loops alternate step by step). Reported step times are medians over the repeats; ``overhead_ratio`` is the median of the
per-repeat ratios ours/plain. Peak memory (CUDA only) is each loop's own: its parameters + optimizer state, counted
at the start of each timed segment (after the warmup steps, so AdamW's two moments exist: 8 bytes per fp32
parameter), + the peak its steps add on top of what was allocated before (both loops live on the device together,
so the raw device peak would count the other loop's weights too).

Memory per ``--activation_checkpointing`` mode (a comma-separated list here: each mode is its own row, named
``PRECISION/MODE`` when more than one is given): after the timed segments, one more step of ours is measured by the
allocator (``memory.StepMemory``: on CPU through the profiler's allocation events), then one step whose
micro-batches are 1 sequence of 8 tokens (eager, so no recompilation); their difference is the activation memory
of the micro-batch, and over its tokens the activation bytes per token. ``--ours_only`` skips the plain loop.

A precision that raises (a backend that fails under torch.compile, out of memory, ...) is recorded as ``failed``
with the error, and the other precisions are still measured; one that cannot run on this machine at all (the plan
falls back) is ``skipped`` with the reason.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import math
import shlex
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from hf_gpt2_train.activation_checkpointing import apply_activation_checkpointing
from hf_gpt2_train.config import Config, ConfigError
from hf_gpt2_train.fsio import write_json_atomic
from hf_gpt2_train.memory import (
    NEAR_ZERO_BATCH,
    StepMemory,
    bytes_per_token,
    largest_micro_batch,
    static_bytes,
)
from hf_gpt2_train.mfu import mfu, peak_tflops
from hf_gpt2_train.model import build_model, flops_per_token, setup_training_forward
from hf_gpt2_train.precision import (
    PrecisionPlan,
    detect_device_type,
    fp8_module_filter,
    plan_precision,
    precision_id,
    prepare_model_for_precision,
)
from hf_gpt2_train.tracking import cpu_model

# --precisions names -> PrecisionConfig fields.
PRECISION_SPECS: dict[str, dict[str, Any]] = {
    "no": {"mixed_precision": "no"},
    "fp16": {"mixed_precision": "fp16"},
    "bf16": {"mixed_precision": "bf16"},
    "fp8": {"mixed_precision": "fp8", "fp8_backend": "auto"},
    "fp8-te": {"mixed_precision": "fp8", "fp8_backend": "te"},
    "fp8-ao": {"mixed_precision": "fp8", "fp8_backend": "ao"},
    "fp8-ao-emulated": {"mixed_precision": "fp8", "fp8_backend": "ao", "fp8_emulate": True},
}
BENCH_ARGS = ("precisions", "steps", "warmup", "repeats", "output", "sequential", "ours_only")
GPU_MEMORY_GIB = (24, 40, 80)  # the micro-batch table's cards (docs/benchmarks.md, Memory)


@dataclass
class LoopStats:
    """Timed segments of one loop."""

    step_times: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    """The loss of every timed step, in order (read after each segment's clock stops)."""

    def summary(self, tokens_per_step: int, fpt: float, peak: float | None) -> dict[str, Any]:
        t = statistics.median(self.step_times)
        tok_s = tokens_per_step / t
        m = mfu(tok_s, fpt, peak)
        return {"tokens_per_sec": tok_s, "step_time_ms": 1000 * t, "mfu": m,
                "peak_memory_gb": max(self.peak_bytes) / 2**30 if self.peak_bytes else None,
                "step_times_ms": [1000 * s for s in self.step_times], "losses": self.losses}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlainLoop:
    """The baseline a careful user would write by hand: no Accelerate, same model, data, optimizer and math."""

    def __init__(self, cfg: Config, plan: PrecisionPlan, loader: Any, accum: int, device: torch.device,
                 compile_model: bool):
        from hf_gpt2_train.optim import build_optimizer

        self.cfg, self.loader, self.accum, self.device = cfg, loader, accum, device
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg.model)
        if plan.effective == "fp8-ao":  # what Accelerate's prepare() does for us, done with torchao directly
            from torchao.float8 import convert_to_float8_training

            convert_to_float8_training(model, config=plan.kwargs_handlers[0].config, module_filter_fn=partial(
                fp8_module_filter, lm_head=plan.lm_head, min_dim=plan.min_dim))
        else:
            prepare_model_for_precision(model, plan, cfg.precision)
        apply_activation_checkpointing(model, cfg.run.activation_checkpointing, cfg.run.activation_checkpointing_every,
                                       transformer_engine=plan.fp8_backend == "te")
        # The same training forward as ours (compiled blocks, loss inside the compiled region): the bench
        # measures what Accelerate and our step add, not a different compile strategy.
        setup_training_forward(model, compile_model, cfg.run.padded_logits, plan.compile_blocks)
        self.model = model.to(device)
        self.optimizer = build_optimizer(self.model, cfg, device)
        mp = plan.accelerator_mixed_precision
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp8": torch.bfloat16, "fp16": torch.float16}.get(mp)
        self.scaler = torch.amp.GradScaler(device.type) if mp == "fp16" else None

    def train_step(self) -> torch.Tensor:
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(self.accum):
            x, y = (t.to(self.device, non_blocking=True) for t in self.loader.next_batch())
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                enabled=self.autocast_dtype is not None):
                loss = self.model(input_ids=x, targets=y)
            scaled = loss / self.accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.max_grad_norm or math.inf)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / self.accum


def _segment(step_fn, static_fn, steps: int, device: torch.device, stats: LoopStats) -> None:
    """Time ``steps`` calls of ``step_fn``; on CUDA also the loop's peak memory: ``static_fn()`` (its parameters and
    optimizer state, measured now, at the segment's start) + what its steps allocate above the start."""
    _sync(device)
    if device.type == "cuda":
        static = static_fn()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    results = [step_fn() for _ in range(steps)]
    _sync(device)
    stats.step_times.append((time.perf_counter() - t0) / steps)
    stats.losses += [float(r[0] if isinstance(r, tuple) else r) for r in results]  # ours returns (loss, norm, lr)
    if device.type == "cuda":
        stats.peak_bytes.append(static + torch.cuda.max_memory_allocated(device) - before)


def _reset_accelerate() -> None:
    """Each precision builds its own Accelerator; Accelerate keeps process-wide state that refuses a second
    mixed precision, so drop it (the distributed PartialState stays). Dynamo's caches go too, or the
    recompile limit would silently send later models to eager mode."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _NearZeroBatches:
    """The train loader's stand-in for one step: every micro-batch is NEAR_ZERO_BATCH random tokens."""

    def __init__(self, position: int, vocab_size: int):
        self.position, self.vocab_size = position, vocab_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, self.vocab_size, NEAR_ZERO_BATCH)
        return x, x


def measure_memory(trainer: Any, gib: tuple[int, ...] = GPU_MEMORY_GIB) -> dict[str, Any]:
    """What one of our steps adds on top of weights and optimizer state at the configured micro-batch, at a near-zero
    one (eager: no recompilation for its shape), their difference (the activations) and, on CUDA, the largest
    micro-batch per card size it implies (``memory.largest_micro_batch``)."""
    device, cfg = trainer.accelerator.device, trainer.cfg
    with StepMemory(device) as real:
        trainer.train_step()
    loader = trainer.train_loader
    trainer.train_loader = _NearZeroBatches(loader.position, cfg.model.vocab_size)
    try:
        eager = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else nullcontext()
        with eager, StepMemory(device) as base:
            trainer.train_step()
    finally:
        trainer.train_loader = loader
    if real.peak_bytes is None or base.peak_bytes is None:
        return {"step_memory_gb": None}
    static = static_bytes(trainer.model, trainer.optimizer, device.type)
    per_token = bytes_per_token(real.peak_bytes, base.peak_bytes, cfg.optim.per_device_train_batch_size
                                * cfg.optim.seq_len)
    out: dict[str, Any] = {
        "static_memory_gb": static / 2**30, "step_memory_gb": real.peak_bytes / 2**30,
        "near_zero_step_memory_gb": base.peak_bytes / 2**30,
        "activation_memory_gb": (real.peak_bytes - base.peak_bytes) / 2**30, "activation_bytes_per_token": per_token,
        "max_micro_batch": None,
    }
    if device.type == "cuda":
        out["max_micro_batch"] = {str(g): largest_micro_batch(g, static, base.peak_bytes, per_token, cfg.optim.seq_len)
                                  for g in gib}
    return out


def bench_precision(base: Config, name: str, mode: str, steps: int, warmup: int, repeats: int, sequential: bool,
                    workdir: Path, ours_only: bool = False) -> dict[str, Any]:
    """Measure one precision in one activation checkpointing mode: our Trainer.train_step against
    PlainLoop.train_step (unless ``ours_only``), then our step's memory."""
    from hf_gpt2_train.trainer import Trainer

    cfg = copy.deepcopy(base)
    for k, v in PRECISION_SPECS[name].items():
        setattr(cfg.precision, k, v)
    cfg.run.activation_checkpointing = mode
    cfg.run.output_dir = str(workdir / f"{name}_{mode}")
    device_type = detect_device_type()
    plan = plan_precision(cfg.precision, device_type)
    if plan.fell_back:
        return {"requested": name, "effective_precision": precision_id(plan.effective),
                "skipped": "; ".join(plan.warnings)}
    _reset_accelerate()
    trainer = Trainer(cfg)
    if trainer.plan.effective != plan.effective:
        raise RuntimeError(f"trainer chose {trainer.plan.effective}, bench planned {plan.effective}")
    device = trainer.accelerator.device
    compile_model = bool(trainer.run_info["compile"])
    accum = trainer.accum
    ours_static = partial(static_bytes, trainer.model, trainer.optimizer)
    ours, plain = LoopStats(), LoopStats()
    plain_loop: PlainLoop | None = None

    def run_plain(loop: PlainLoop) -> None:
        _segment(loop.train_step, partial(static_bytes, loop.model, loop.optimizer), steps, device, plain)

    if sequential or ours_only:
        for _ in range(warmup):
            trainer.train_step()
        for _ in range(repeats):
            _segment(trainer.train_step, ours_static, steps, device, ours)
    else:
        plain_loop = PlainLoop(cfg, plan, trainer.train_loader, accum, device, compile_model)
        for _ in range(warmup):  # compile both and touch all memory before any timed segment
            trainer.train_step()
            plain_loop.train_step()
        for r in range(repeats):
            for which in (("ours", "plain") if r % 2 == 0 else ("plain", "ours")):
                if which == "ours":
                    _segment(trainer.train_step, ours_static, steps, device, ours)
                else:
                    run_plain(plain_loop)
    info = {k: trainer.run_info.get(k) for k in ("effective_precision", "fp8_backend", "fp8_coverage",
                                                   "fp8_block_coverage")}
    memory = measure_memory(trainer)  # relative to what is allocated at its start: the plain loop's state is not in it
    if sequential and not ours_only:  # one model on the device at a time (large presets): ours, then the plain loop
        loader = trainer.train_loader
        del trainer
        _reset_accelerate()
        plain_loop = PlainLoop(cfg, plan, loader, accum, device, compile_model)
        for _ in range(warmup):
            plain_loop.train_step()
        for _ in range(repeats):
            run_plain(plain_loop)
    tokens_per_step = cfg.optim.total_batch_size
    fpt = flops_per_token(cfg.model, cfg.optim.seq_len)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    peak = peak_tflops(plan.effective, device_name, cfg.run.device_peak_tflops)
    result: dict[str, Any] = {"requested": name, "activation_checkpointing": mode, **info,
                              **ours.summary(tokens_per_step, fpt, peak), **memory,
                              "plain": None if ours_only else plain.summary(tokens_per_step, fpt, peak),
                              "peak_tflops": peak, "grad_accum_steps": accum, "compile": compile_model}
    if ours_only:
        result["overhead_ratio"] = None
    elif sequential:
        result["overhead_ratio"] = result["step_time_ms"] / result["plain"]["step_time_ms"]
    else:
        result["overhead_ratio"] = statistics.median(a / b for a, b in zip(ours.step_times, plain.step_times,
                                                                           strict=True))
    del plain_loop
    _reset_accelerate()
    return result


def run_bench(cfg: Config, precisions: list[str], steps: int, warmup: int, repeats: int,
              sequential: bool = False, output: Path | None = None, modes: list[str] | None = None,
              ours_only: bool = False, command: str | None = None) -> dict[str, Any]:
    """Benchmark each precision in each activation checkpointing mode (default: the config's); returns the JSON
    document (see docs/benchmarks.md for its fields). Rows are named by precision, ``PRECISION/MODE`` when several
    modes are measured.

    ``output``: written after every row, so a bench stopped part-way (a time limit) keeps what it measured.
    """
    from accelerate import PartialState

    from hf_gpt2_train.activation_checkpointing import MODES

    modes = modes or [cfg.run.activation_checkpointing]
    unknown = [p for p in precisions if p not in PRECISION_SPECS]
    if unknown:
        raise ConfigError(f"unknown precision(s) {', '.join(unknown)} for --precisions: choose from "
                          f"{', '.join(PRECISION_SPECS)}")
    if [m for m in modes if m not in MODES]:
        raise ConfigError(f"--activation_checkpointing {','.join(modes)}: each mode must be one of {', '.join(MODES)}")
    if steps < 1 or warmup < 0 or repeats < 1:
        raise ConfigError("--steps and --repeats must be >= 1 and --warmup >= 0")
    if PartialState().num_processes > 1:
        raise ConfigError("bench measures one process: run it with python/hf-gpt2-train, not accelerate launch "
                          "or torchrun")
    if cfg.optim.per_device_train_batch_size == "auto":
        raise ConfigError("bench measures a given micro-batch: pass a number for --per_device_train_batch_size")
    cfg.tracking.report_to = "none"
    cfg.eval.hellaswag = False
    cfg.eval.eval_steps = 0
    cfg.validate(world_size=1)
    device = detect_device_type()
    doc: dict[str, Any] = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "command": command,
        "device": torch.cuda.get_device_name() if device == "cuda" else f"{cpu_model()}, {torch.get_num_threads()} "
                  "threads",
        "preset": cfg.preset, "model": dict(vars(cfg.model)), "seq_len": cfg.optim.seq_len,
        "micro_batch_size": cfg.optim.per_device_train_batch_size, "tokens_per_step": cfg.optim.total_batch_size,
        "steps": steps, "warmup": warmup, "repeats": repeats, "sequential": sequential,
        "activation_checkpointing_every": cfg.run.activation_checkpointing_every,
        "versions": {"torch": torch.__version__}, "overhead_ratio": None, "precisions": {},
    }
    results = doc["precisions"]
    with tempfile.TemporaryDirectory(prefix="hf-gpt2-bench-") as tmp:
        for name in precisions:
            for mode in modes:
                key = name if len(modes) == 1 else f"{name}/{mode}"
                try:
                    results[key] = bench_precision(cfg, name, mode, steps, warmup, repeats, sequential, Path(tmp),
                                                   ours_only)
                except Exception as e:  # noqa: BLE001  one row's failure must not cost the others' numbers
                    results[key] = {"requested": name, "failed": f"{type(e).__name__}: {e}".strip()[:2000]}
                    _reset_accelerate()
                measured = [r["overhead_ratio"] for r in results.values() if r.get("overhead_ratio") is not None]
                doc["overhead_ratio"] = max(measured) if measured else None
                if output is not None:  # a reader (or a kill) never sees half a file
                    output.parent.mkdir(parents=True, exist_ok=True)
                    write_json_atomic(output, doc, indent=2)
    return doc


def format_table(doc: dict[str, Any]) -> str:
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    head = (f"{'precision':16s} {'effective':16s} {'tok/s':>10s} {'plain tok/s':>11s} {'ms/step':>9s} "
            f"{'plain ms':>9s} {'overhead':>8s} {'MFU':>6s} {'peak GB':>8s} {'act GB':>7s} {'act B/tok':>9s} "
            f"{'fp8 cov':>7s}")
    lines = [f"bench on {doc['device']}: preset {doc['preset'] or '-'}, {doc['tokens_per_step']:,} tokens/step, "
             f"{doc['steps']} steps x {doc['repeats']} repeats (medians)", head, "-" * len(head)]
    for name, r in doc["precisions"].items():
        if "skipped" in r or "failed" in r:
            status = "skipped" if "skipped" in r else "failed"
            lines.append(f"{name:16s} {status}: {r[status]}")
            continue
        p = r["plain"] or {}
        lines.append(f"{name:16s} {r['effective_precision']:16s} {r['tokens_per_sec']:10,.0f} "
                     f"{f(p.get('tokens_per_sec'), '11,.0f')} {r['step_time_ms']:9.1f} "
                     f"{f(p.get('step_time_ms'), '9.1f')} {f(r['overhead_ratio'], '7.3f') + 'x' if r['overhead_ratio'] is not None else '-':>8s} {f(r['mfu'], '6.1%')} "
                     f"{f(r['peak_memory_gb'], '8.2f')} {f(r.get('activation_memory_gb'), '7.3f')} "
                     f"{f(r.get('activation_bytes_per_token'), '9,.0f')} "
                     f"{f(r['fp8_coverage'] if r['fp8_backend'] else None, '7.1%')}")
    if doc["overhead_ratio"] is not None:
        lines.append(f"overhead_ratio (worst over precisions, ours/plain step time): {doc['overhead_ratio']:.3f}")
    tables = [(n, r["max_micro_batch"]) for n, r in doc["precisions"].items() if r.get("max_micro_batch")]
    for name, table in tables:
        lines.append(f"largest micro-batch at seq_len {doc['seq_len']} ({name}): "
                     + ", ".join(f"{b} on {g} GB" for g, b in table.items()))
    return "\n".join(lines)


def _cmd_bench(args: argparse.Namespace) -> int:
    from hf_gpt2_train.cli import config_from_args

    on_gpu = detect_device_type() == "cuda"
    rest = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in BENCH_ARGS})
    modes = [m.strip() for m in str(getattr(rest, "activation_checkpointing", "")).split(",") if m.strip()]
    if len(modes) > 1:  # a list of modes is bench's own; one mode is an ordinary config flag
        del rest.activation_checkpointing
    if not getattr(rest, "preset", "") and not getattr(rest, "config", ""):
        rest.preset = "gpt2" if on_gpu else "quickstart"
    cfg: Config = config_from_args(rest)
    precisions = [p.strip() for p in (args.precisions or ("bf16,fp8-te,fp8-ao" if on_gpu else "no")).split(",")
                  if p.strip()]
    steps = args.steps or (10 if on_gpu else 1)
    repeats = args.repeats or (5 if on_gpu else 8)
    warmup = args.warmup if args.warmup >= 0 else (3 if on_gpu else 1)
    out = Path(args.output) if args.output else None
    doc = run_bench(cfg, precisions, steps, warmup, repeats, args.sequential, output=out, modes=modes,
                    ours_only=args.ours_only, command=shlex.join(["hf-gpt2-train", *sys.argv[1:]]))
    print(format_table(doc))
    if out is not None:
        print(f"wrote {out}")
    failed = [n for n, r in doc["precisions"].items() if "failed" in r]
    if failed:  # the others were measured and written; the exit code still says something broke
        print(f"hf-gpt2-train: bench: {', '.join(failed)} failed (see above)", file=sys.stderr)
        return 1
    return 0


def register_cli(subparsers: Any) -> None:
    """Add the `bench` subcommand (takes every training config flag too, e.g. --per_device_train_batch_size)."""
    from hf_gpt2_train.cli import add_config_flags

    p = subparsers.add_parser("bench", help="Throughput/MFU of our training step vs a plain PyTorch loop.",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precisions", default=None, help="Comma-separated: " + ", ".join(PRECISION_SPECS)
                   + " (default: bf16,fp8-te,fp8-ao on a GPU, no on CPU). Ones that cannot run here are "
                   "reported as skipped, ones that raise as failed (exit code 1; the others are still measured).")
    p.add_argument("--steps", type=int, default=0, help="Timed optimizer steps per segment (default 10 GPU, 1 CPU).")
    p.add_argument("--warmup", type=int, default=-1, help="Untimed steps of each loop before timing (compile, "
                   "allocator; default 3 GPU, 1 CPU).")
    p.add_argument("--repeats", type=int, default=0, help="Segments per loop, alternating ours/plain (default 5 GPU, "
                   "8 CPU).")
    p.add_argument("--output", default="", help="Write the results as JSON to this file (rewritten after each "
                   "precision, so an interrupted bench keeps what it measured).")
    p.add_argument("--ours_only", action="store_true", help="Measure only our step, not the plain loop (no "
                   "overhead_ratio): for memory and step time per --activation_checkpointing mode, which takes a "
                   "comma-separated list here (none,full,selective: one row each, named PRECISION/MODE).")
    p.add_argument("--sequential", action="store_true", help="Run ours, then the plain loop, with one model on "
                   "the device at a time (for presets too large for two copies); no alternation.")
    add_config_flags(p)
    p.set_defaults(func=_cmd_bench)
