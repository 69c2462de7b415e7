"""The device check's Muon row (``scripts/gpu_check.py`` lists it in its STEPS).

1. Muon vs AdamW step time on the same model and batches in one run (``benchmarks/optimizer_step.py``): gpt2 in
   bf16, compiled, where Newton-Schulz runs in bfloat16; the dry run: the quickstart model in fp32 on CPU.
2. A short Muon + WSD training run (compiled, the GPU's defaults): its loss falls and stays finite.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def step_muon(ctx: Any, *, py: str, dry_run: bool, bench_model: list[str], bench_batch: list[str],
              train_model: list[str], train_batch: list[str], run_flags: list[str]) -> dict[str, Any]:
    repo = Path(__file__).resolve().parents[1]
    bench_json = ctx.work / "muon_step_time.json"
    timing = ["--precision", "no", "--repeats", "2", "--warmup", "1", "--compile", "false"] if dry_run else \
        ["--precision", "bf16", "--repeats", "3", "--warmup", "2", "--compile", "true"]
    ctx.run([py, str(repo / "benchmarks" / "optimizer_step.py"), *bench_model, *bench_batch, *ctx.data(), *timing,
             "--output", str(bench_json)], name="Muon vs AdamW step time")
    bench = json.loads(bench_json.read_text())
    run_dir, steps = ctx.work / "muon_train", 6 if dry_run else 20
    ctx.run([py, "-m", "hf_gpt2_train", "train", *train_model, *train_batch, *ctx.data(), *run_flags,
             "--optimizer", "muon", "--lr_schedule", "wsd", "--max_steps", str(steps), "--warmup_steps", "2",
             "--checkpoint_steps", "0", "--eval_steps", "0", "--output_dir", str(run_dir)], name="Muon + WSD run")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    loss = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    result = {"device": bench["device"], "precision": bench["precision"], "compile": bench["compile"],
              "tokens_per_step": bench["tokens_per_step"], "newton_schulz_dtype": bench["newton_schulz_dtype"],
              "adamw_step_ms": bench["adamw"]["step_ms"], "muon_step_ms": bench["muon"]["step_ms"],
              "adamw_optimizer_step_ms": bench["adamw"]["optimizer_step_ms"],
              "muon_optimizer_step_ms": bench["muon"]["optimizer_step_ms"],
              "step_time_ratio": bench["step_time_ratio"], "muon_extra_ms_per_step": bench["muon_extra_ms_per_step"],
              "train_first_loss": loss[min(loss)], "train_final_loss": loss[max(loss)], "train_steps": max(loss)}
    if not all(v == v and abs(v) < float("inf") for v in loss.values()) or loss[max(loss)] >= loss[min(loss)]:
        result["error"] = f"the Muon run did not learn: losses {loss}"
    return result
