"""The device check's memory step (imported by scripts/gpu_check.py): peak memory and step time of each
``--activation_checkpointing`` mode per preset, and the largest micro-batch on 24/40/80 GB cards they imply.

For each preset, one ``bench --ours_only --activation_checkpointing none,full,selective`` run (bf16, compile on, as
training runs on a GPU) at micro-batch 8 x 1024 with 2 accumulation steps: per mode, the step time, what the step
allocates on top of weights and optimizer state at that micro-batch and at a near-zero one, the activation bytes per
token, and ``max_micro_batch`` (``memory.largest_micro_batch``). Presets run smallest first until the step's time cap;
those left are listed as not measured. The dry run measures the quickstart model on CPU, eager, in fp32.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

if os.environ.get("GPU_CHECK_DRY_RUN", "") not in ("", "0"):
    PRESETS = ["quickstart"]
    BATCH = ["--per_device_train_batch_size", "4", "--total_batch_size", "512"]  # 4 x 64 tokens, 2 accumulation steps
    TIMING = ["--steps", "1", "--warmup", "0", "--repeats", "1", "--compile", "false"]
else:
    PRESETS = ["gpt2", "gpt2-large", "gpt2-medium", "gpt2-xl"]
    BATCH = ["--per_device_train_batch_size", "8", "--total_batch_size", "16384"]  # 8 x 1024 tokens, 2 accumulation steps
    TIMING = ["--steps", "2", "--warmup", "1", "--repeats", "2", "--compile", "true"]
MODES = "none,full,selective"
KEEP = ("step_time_ms", "tokens_per_sec", "static_memory_gb", "step_memory_gb", "near_zero_step_memory_gb",
        "activation_memory_gb", "activation_bytes_per_token", "max_micro_batch", "peak_memory_gb", "losses", "failed")


def memory_modes_step(cli: Callable[..., list[str]], precision: str,
                      step_error: type[Exception]) -> Callable[[Any], dict[str, Any]]:
    """The step for gpu_check.STEPS (its ``cli``, the half precision it measures, its ``StepError``)."""
    return lambda ctx: _memory_modes(ctx, cli, precision, step_error)


def _memory_modes(ctx: Any, cli: Callable[..., list[str]], precision: str,
                  step_error: type[Exception]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for preset in PRESETS:
        path = ctx.work / f"memory_{preset}.json"
        try:
            ctx.run(cli("bench", "--preset", preset, *BATCH, *ctx.data(), *TIMING, "--precisions", precision,
                        "--activation_checkpointing", MODES, "--ours_only", "--output", str(path)),
                    name=f"bench {preset} {MODES}")
        except (step_error, TimeoutError) as e:
            if not path.exists():
                if results and isinstance(e, TimeoutError):  # the cap: record what was measured
                    results[preset] = {"not_measured": str(e)}
                    continue
                raise
            results[preset] = {"error": str(e)}
        doc = json.loads(path.read_text())
        rows = {r.get("activation_checkpointing", key.rpartition("/")[2]): {k: r[k] for k in KEEP if k in r}
                for key, r in doc["precisions"].items()}
        results[preset] = {**results.get(preset, {}), "device": doc["device"], "seq_len": doc["seq_len"],
                           "micro_batch_size": doc["micro_batch_size"], "modes": rows}
    measured = {p: r for p, r in results.items() if "modes" in r}
    problems = [f"{p}: {r['error']}" for p, r in results.items() if "error" in r]
    problems += [f"{p} {m} failed: {row['failed']}" for p, r in measured.items() for m, row in r["modes"].items()
                 if "failed" in row]
    out: dict[str, Any] = {"precision": precision, "presets": results, "table": table(measured)}
    if problems:
        out["error"] = "; ".join(problems)
    return out


def table(measured: dict[str, Any]) -> list[str]:
    """Markdown rows for docs/benchmarks.md#memory: preset, mode, activation bytes/token, step time, micro-batches."""
    rows = []
    for preset, r in measured.items():
        for mode, row in r["modes"].items():
            if "failed" in row:
                continue
            mb = row.get("max_micro_batch") or {}
            rows.append(f"| {preset} | {mode} | {row['activation_bytes_per_token']:,.0f} | {row['step_time_ms']:.0f} | "
                        + " | ".join(str(mb.get(g, "-")) for g in ("24", "40", "80")) + " |")
    return rows
