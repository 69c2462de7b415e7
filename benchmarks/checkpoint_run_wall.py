"""What periodic saves cost a user: wall time of whole training runs (the real CLI) with synchronous saves,
asynchronous saves (the default) and only the final save, interleaved in one benchmark run.

Each mode is the same ``python -m hf_gpt2_train train`` command (same data, steps and seed), timed from the start
of the process to its exit, so every cost a save adds (the loop's pause, a background write competing with
training for the cores, the final wait) is in the figure. Modes run in rotating order, ``--repeats`` times each;
medians are reported with the issue's ratio ``(async - final only) / (sync - final only)`` (target <= 0.5).

Usage (the issue's measurement, ~45 s per run on a 2-core CPU):
``python benchmarks/checkpoint_run_wall.py --repeats 3 --output docs/bench/checkpoint_run_wall.json``;
extra ``train`` flags after ``--`` (e.g. ``-- --preset quickstart --max_steps 8``) override the defaults below.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from results import add_folder_args, scratch_folder, stamp, write_results  # benchmarks/ is first on sys.path

# The run: gpt2 (1.5 GB of state per save), 60 short fp32 steps, no evaluation work but the final one.
TRAIN_FLAGS = ["--preset", "gpt2", "--seq_len", "32", "--per_device_train_batch_size", "1", "--total_batch_size", "32",
               "--max_steps", "60", "--eval_steps", "0", "--hellaswag", "false", "--val_batches", "1",
               "--sample_max_new_tokens", "0"]
MODES = {"final_only": ["--checkpoint_steps", "0"],
         "sync": ["--async_checkpoint", "false"],
         "async": ["--async_checkpoint", "true"]}
SAVED = re.compile(r"saved checkpoint \S+ at step (\d+) in ([\d.]+)s(?: in the background \(training paused ([\d.]+)s)?")


def one_run(mode: str, flags: list[str], save_every: int, workdir: Path) -> dict[str, Any]:
    out = workdir / f"run-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    every = [] if mode == "final_only" else ["--checkpoint_steps", str(save_every)]
    cmd = [sys.executable, "-m", "hf_gpt2_train", "train", *flags, *every, *MODES[mode], "--output_dir", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    if proc.returncode:
        raise SystemExit(f"{mode} run failed (exit {proc.returncode}):\n{log[-3000:]}")
    saves = [{"step": int(m[1]), "seconds": float(m[2]), "paused_s": None if m[3] is None else float(m[3])}
             for m in SAVED.finditer(log)]
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": wall, "saves": saves}


def run(flags: list[str], save_every: int, repeats: int, workdir: Path) -> dict[str, Any]:
    modes = list(MODES)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for r in range(repeats):
        for mode in modes[r % 3:] + modes[:r % 3]:
            runs[mode].append(one_run(mode, flags, save_every, workdir))
            print(f"  repeat {r + 1}: {mode} {runs[mode][-1]['wall_s']:.1f}s", flush=True)
    med = {m: statistics.median(x["wall_s"] for x in v) for m, v in runs.items()}
    sync_cost, async_cost = med["sync"] - med["final_only"], med["async"] - med["final_only"]
    return {
        **stamp(),
        "command": ["python", "-m", "hf_gpt2_train", "train", *flags],
        "save_every": save_every, "repeats": repeats, "runs": runs, "median_wall_s": med,
        "sync_cost_s": sync_cost, "async_cost_s": async_cost,
        "async_vs_sync_cost": async_cost / sync_cost if sync_cost > 0 else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="Runs of each mode (rotating order); medians reported.")
    ap.add_argument("--save_every", type=int, default=15, help="--checkpoint_steps of the sync and async runs.")
    add_folder_args(ap)
    ap.add_argument("train_flags", nargs="*", help="After --: train flags added to (and overriding) the defaults.")
    args = ap.parse_args(argv)
    with scratch_folder("ckpt-run-wall-", args.dir) as workdir:
        res = run(TRAIN_FLAGS + args.train_flags, args.save_every, args.repeats, workdir)
    med, ratio = res["median_wall_s"], res["async_vs_sync_cost"]
    print(f"\nwhole-run wall time, median of {args.repeats} ({res['machine']}): "
          + ", ".join(f"{m} {v:.1f}s" for m, v in med.items()))
    print(f"periodic saves cost: sync +{res['sync_cost_s']:.1f}s, async +{res['async_cost_s']:.1f}s "
          f"({'-' if ratio is None else f'{ratio:.2f}'} of sync's; target <= 0.5)")
    write_results(args.output, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
