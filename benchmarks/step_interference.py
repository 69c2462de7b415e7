"""What slows a training thread that has a core to spare: the background checkpoint write, or any work at all on
the other core?

docs/benchmarks.md (Checkpoint I/O) measured a gpt2 step on one thread at 1.21x its time while an asynchronous save
was written, with the second core free for the writer. This separates the candidates, in one run: the same step
(one thread, ``torch.set_num_threads(1)``) while the other core runs

* ``alone``: nothing;
* ``cpu_spin``: another process spinning in a loop that touches no memory (only the core is shared: caches and
  the host's scheduling of the VM's vCPUs);
* ``memory_stream``: another process copying a 256 MiB buffer over and over, no Python in the loop (the memory
  traffic of a save's copies, without its Python, GIL or system calls);
* ``save_in_flight``: the steps that begin while an asynchronous save of this training state is being written by
  ``CheckpointManager`` (the writer thread, the FIFO reader process, the staging copy).

Modes rotate, ``--repeats`` times; medians of the step times, and each as a ratio of ``alone``. A step that slows as
much beside ``memory_stream`` as beside the save is limited by memory bandwidth, which no choice of thread or process
for the writer removes.

Usage: ``python benchmarks/step_interference.py --repeats 3 --output docs/bench/step_interference_cpu.json``
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path
from time import perf_counter
from typing import Any

import torch
from results import add_folder_args, scratch_folder, stamp, write_results  # benchmarks/ is first on sys.path

INTERFERERS = {
    "cpu_spin": "x = 0\nwhile True:\n    x = (x + 1) & 0xFFFF\n",
    "memory_stream": "import numpy as np\na = np.ones(1 << 25)\nb = np.empty_like(a)\nwhile True:\n    np.copyto(b, a)\n",
}


def measure(preset: str, tokens: int, steps: int, save_every: int, repeats: int, workdir: Path) -> dict[str, Any]:
    from checkpoint_io import training_state  # benchmarks/ is this script's folder, first on sys.path

    from hf_gpt2_train.checkpoint import CheckpointManager
    from hf_gpt2_train.config import CheckpointConfig

    t = training_state(preset, tokens, workdir)
    acc, state, train_step = t.acc, t.state, t.train_step
    mgr = CheckpointManager(acc, CheckpointConfig(checkpoint_steps=1, keep_last=1, async_checkpoint=True), workdir,
                            t.info)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train_step()
    state.step += 1
    mgr.maybe_save(state)  # the first asynchronous save allocates the staging buffers: not measured
    mgr.wait()
    modes = ["alone", *INTERFERERS, "save_in_flight"]
    step_s: dict[str, list[float]] = {m: [] for m in modes}
    try:
        for r in range(repeats):
            for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
                other = subprocess.Popen([sys.executable, "-c", INTERFERERS[mode]]) if mode in INTERFERERS else None
                try:
                    for s in range(1, steps + 1):
                        busy = mgr.writer.running
                        t0 = perf_counter()
                        train_step()
                        if mode != "save_in_flight" or busy:
                            step_s[mode].append(perf_counter() - t0)
                        if mode == "save_in_flight" and s % save_every == 0:
                            state.step += 1
                            mgr.maybe_save(state)
                    mgr.wait()
                finally:
                    if other is not None:
                        other.kill()
                        other.wait()
                print(f"  repeat {r + 1}: {mode}, {len(step_s[mode])} steps so far", flush=True)
    finally:
        torch.set_num_threads(threads)
    # A small model's save may be written before the next step begins: no step of that mode is measured.
    med = {m: statistics.median(v) if v else None for m, v in step_s.items()}
    return {
        **stamp(torch.__version__),
        "command": ["python", "benchmarks/step_interference.py", *sys.argv[1:]],
        "preset": preset, "tokens_per_step": tokens, "steps_per_mode": steps, "save_every": save_every,
        "repeats": repeats, "train_threads": 1, "step_s": step_s, "median_step_s": med,
        "vs_alone": {m: None if med[m] is None else med[m] / med["alone"] for m in modes},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="gpt2", help="Model preset (gpt2: 1.5 GB of state per save).")
    ap.add_argument("--tokens", type=int, default=32, help="Tokens per training step (one sequence).")
    ap.add_argument("--steps", type=int, default=12, help="Training steps per mode and repeat.")
    ap.add_argument("--save_every", type=int, default=4, help="A save every N steps in the save_in_flight mode.")
    ap.add_argument("--repeats", type=int, default=3, help="Rounds over the modes (rotating order).")
    add_folder_args(ap)
    args = ap.parse_args(argv)
    with scratch_folder("step-interference-", args.dir) as workdir:
        res = measure(args.preset, args.tokens, args.steps, args.save_every, args.repeats, workdir)
    print(f"\none training thread, the other core ({res['machine']}): "
          + ", ".join(f"{m} -" if v is None else f"{m} {v * 1e3:.0f} ms ({res['vs_alone'][m]:.2f}x)"
                      for m, v in res["median_step_s"].items()))
    write_results(args.output, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
