"""The device check's checkpoint-save row (``scripts/gpu_check.py`` lists it in its STEPS).

What periodic saves cost a whole run on this machine, synchronous against asynchronous: three real training runs
(only the final save, a save every N steps written by the loop, the same saves written in the background), timed
from process start to exit by ``benchmarks/checkpoint_run_wall.py``. The CPU measurement behind the default
(asynchronous on a GPU, synchronous on CPU) is in docs/benchmarks.md, Checkpoint I/O; this is its GPU side.
GPU: gpt2 (1.5 GB of state per save) in bf16 at 1024 tokens per sequence, eager (compile would add its warm-up
to every run and is not what is compared). Dry run: the quickstart model on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def step_saves(ctx: Any, *, py: str, dry_run: bool) -> dict[str, Any]:
    repo = Path(__file__).resolve().parents[1]
    out = ctx.work / "checkpoint_run_wall.json"
    if dry_run:
        save_every, flags = 2, ["--preset", "quickstart", "--max_steps", "4"]
    else:
        save_every = 15
        flags = ["--preset", "gpt2", "--mixed_precision", "bf16", "--compile", "false", "--seq_len", "1024",
                 "--per_device_train_batch_size", "16", "--total_batch_size", "16384", "--max_steps", "60"]
    ctx.run([py, str(repo / "benchmarks" / "checkpoint_run_wall.py"), "--repeats", "1", "--save_every",
             str(save_every), "--dir", str(ctx.work), "--output", str(out), "--", *flags, *ctx.data()],
            name="final save only vs synchronous vs asynchronous saves")
    res = json.loads(out.read_text())
    sync_saves = [s["seconds"] for s in res["runs"]["sync"][0]["saves"]]
    paused = [s["paused_s"] for s in res["runs"]["async"][0]["saves"] if s["paused_s"] is not None]
    result = {"command": res["command"], "save_every": save_every, "wall_s": res["median_wall_s"],
              "sync_cost_s": res["sync_cost_s"], "async_cost_s": res["async_cost_s"],
              "async_vs_sync_cost": res["async_vs_sync_cost"], "sync_save_s": sync_saves,
              "async_paused_s": paused, "async_background_saves": len(paused)}
    if not paused:
        result["error"] = "the asynchronous run wrote no save in the background"
    return result
