"""Where a checkpoint save's time goes: each part of writing a GPT-2 training state, measured on its own.

On one state (model + AdamW moments after a real step) and the filesystem checkpoints go to, each part is timed
alone (wall time, CPU time of this process, minor page faults), alternating repeats, medians reported:

* host copy: the state copied into fresh buffers (what the first asynchronous save pays: every page is new
  memory) and into the same buffers again (every later save);
* the previous writer (Accelerate's ``save``: safetensors ``save_file`` and ``torch.save`` through the page cache,
  then ``atomic.seal``: fsync, xxh3_128 read back from the files), split into serialisation to memory, the
  page-cache write, the fsync and the checksums;
* the current writer (``checkpoint/direct.py``: the same bytes with ``O_DIRECT`` from reused aligned buffers,
  checksummed on the way out), per file, and torch.save's CRC-32 (a part of the zip format);
* GIL holds: the longest and the total stall of a Python loop on the main thread while each writer runs on a
  background thread (a GPU training loop is such a thread: while it waits for the GIL it launches no kernels);
* host RAM the staging buffers of an asynchronous save take, per preset (computed from the state's sizes).

Usage: ``python benchmarks/save_decomposition.py [--preset gpt2] [--dir PATH] [--repeats 3] [--output FILE.json]``
(run it alone on the machine: timings of CPU work mean nothing while other jobs share the cores).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import statistics
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from results import add_folder_args, scratch_folder, stamp, write_results  # benchmarks/ is first on sys.path


def _cpu() -> float:
    """CPU seconds of this process and of its children that have ended (direct.py's FIFO reader is one)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(fn: Any) -> dict[str, float]:
    """Wall and CPU seconds (every thread of this process, and the child processes it waited for) and minor page
    faults of ``fn()`` (this process only)."""
    w, c, f = time.perf_counter(), _cpu(), _faults()
    fn()
    return {"wall_s": time.perf_counter() - w, "cpu_s": _cpu() - c, "minor_faults": _faults() - f}


def gil_stalls(fn: Any) -> dict[str, float]:
    """Run ``fn`` on a background thread while the main thread spins on tiny Python steps; the longest gap between
    two steps and the time lost to gaps over 1 ms (the switch interval is 5 ms: a thread that keeps the GIL in C
    code holds it at least that long)."""
    done = threading.Event()

    def work() -> None:
        try:
            fn()
        finally:
            done.set()

    t = threading.Thread(target=work)
    last = time.perf_counter()
    t.start()
    longest = lost = 0.0
    while not done.is_set():
        now = time.perf_counter()
        gap = now - last
        longest = max(longest, gap)
        if gap > 1e-3:
            lost += gap
        last = now
    t.join()
    return {"longest_stall_ms": 1000 * longest, "stalled_s": lost}


def training_state(preset: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's state dict and AdamW's state dict after one real step of ``preset`` (fp32, CPU)."""
    from hf_gpt2_train.config import build_config
    from hf_gpt2_train.model import build_model, lm_logits, lm_loss

    cfg = build_config(preset=preset, cli={"output_dir": "unused"})
    model = build_model(cfg.model, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, cfg.model.vocab_size, (1, 33))
    lm_loss(lm_logits(model, x[:, :-1], cfg.model.vocab_size), x[:, 1:]).backward()
    opt.step()
    return model.state_dict(), opt.state_dict()


def staging_bytes_per_preset() -> dict[str, int]:
    """Bytes an asynchronous save stages in host memory per preset: the model's tensors (the tied embedding once)
    and AdamW's fp32 moments and step counters, as the state dicts hold them in training (fp32 master weights)."""
    from hf_gpt2_train.config import PRESETS, build_config
    from hf_gpt2_train.model import build_model

    out = {}
    for preset in PRESETS:
        cfg = build_config(preset=preset, cli={"output_dir": "unused"})
        with torch.device("meta"):
            model = build_model(cfg.model)
        params = list(model.parameters())  # unique: the tied lm_head is the embedding
        weights = sum(p.numel() * p.element_size() for p in params)
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        moments = sum(2 * p.numel() * 4 + 4 for p in params)  # exp_avg, exp_avg_sq (fp32) and a scalar step
        out[preset] = weights + buffers + moments
    return out


def run(preset: str, workdir: Path, repeats: int) -> dict[str, Any]:
    from accelerate import PartialState
    from accelerate.utils import save

    from hf_gpt2_train.checkpoint import atomic, direct

    PartialState(cpu=True)  # accelerate's save and logging need its state
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)  # "Removed shared tensor": expected
    msd, osd = training_state(preset)
    tensors = list(msd.values()) + [t for st in osd["state"].values() for t in st.values()]
    state_bytes = sum(t.numel() * t.element_size() for t in tensors)
    parts: dict[str, list[dict[str, float]]] = {}

    def add(name: str, fn: Any) -> None:
        parts.setdefault(name, []).append(measure(fn))

    class Sink:
        def write(self, b: Any) -> int:
            return memoryview(b).nbytes

        def flush(self) -> None:
            pass

    def old_files(folder: Path) -> None:
        save(OrderedDict(msd), folder / "model.safetensors", safe_serialization=True)
        save(osd, folder / "optimizer.bin")

    def new_files(folder: Path) -> dict[str, Any]:
        return {"model.safetensors": direct.save_safetensors(OrderedDict(msd), folder / "model.safetensors"),
                "optimizer.bin": direct.save_torch(osd, folder / "optimizer.bin")}

    def old_save(folder: Path) -> None:
        folder.mkdir()
        old_files(folder)
        atomic.seal(folder, {})

    def new_save(folder: Path) -> None:
        folder.mkdir()
        atomic.seal(folder, {}, new_files(folder))

    from safetensors.torch import save as safetensors_bytes
    from torch.utils.serialization import config as ser_config

    model_once = {k: v for k, v in msd.items() if k != "lm_head.weight"}  # the tied weight, as save_state drops it
    for i in range(repeats):
        folder = workdir / f"save{i}"
        (folder / "old").mkdir(parents=True)
        (folder / "new").mkdir(parents=True)
        copies: list[torch.Tensor] = []
        add("host copy into fresh buffers", lambda: copies.extend(t.clone() for t in tensors))  # noqa: B023
        add("host copy into the same buffers again",
            lambda: [c.copy_(t) for c, t in zip(copies, tensors, strict=True)])  # noqa: B023
        copies.clear()
        add("old: serialise model.safetensors to memory",
            lambda: safetensors_bytes(model_once, metadata={"format": "pt"}))
        add("torch.save optimizer to a null sink (CRC-32 on)", lambda: torch.save(osd, Sink()))
        ser_config.save.compute_crc32 = False
        add("torch.save optimizer to a null sink (CRC-32 off)", lambda: torch.save(osd, Sink()))
        ser_config.save.compute_crc32 = True
        for side in (("old", "new") if i % 2 == 0 else ("new", "old")):  # alternate who goes first
            d = folder / side
            if side == "old":
                add("old: write both files through the page cache", lambda: old_files(d))  # noqa: B023
                files = atomic.data_files(d)
                add("old: fsync both files", lambda: [atomic.fsync_path(p) for p in files])  # noqa: B023
                add("old: xxh3_128 read back from the files",
                    lambda: atomic.file_entries(d, files, _pool()))  # noqa: B023
                add("old: whole save (write + seal)", lambda: old_save(d / "again"))  # noqa: B023
            else:
                add("new: model.safetensors, O_DIRECT + xxh3_128 + fsync",
                    lambda: direct.save_safetensors(OrderedDict(msd), d / "model.safetensors"))  # noqa: B023
                add("new: optimizer.bin, O_DIRECT + xxh3_128 + fsync",
                    lambda: direct.save_torch(osd, d / "optimizer.bin"))  # noqa: B023
                add("new: whole save (write + seal)", lambda: new_save(d / "again"))  # noqa: B023
        shutil.rmtree(folder)
        print(f"  repeat {i + 1} done", flush=True)
    gil = {}
    for name, fn in (("old", old_files), ("new", new_files)):
        folder = workdir / f"gil-{name}"
        folder.mkdir()
        gil[name] = gil_stalls(lambda: fn(folder))  # noqa: B023
        shutil.rmtree(folder)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in parts.items()}
    return {
        **stamp(torch.__version__),
        "preset": preset,
        "state_bytes": state_bytes,
        "repeats": repeats,
        "median": med,
        "all": parts,
        "gil_while_writing_on_a_thread": gil,
        "staging_bytes_per_preset": staging_bytes_per_preset(),
    }


def _pool() -> Any:
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="gpt2", help="Model preset (default gpt2, 124M).")
    add_folder_args(ap)
    ap.add_argument("--repeats", type=int, default=3, help="Repeats of every part; medians are reported.")
    args = ap.parse_args(argv)
    with scratch_folder("save-decomposition-", args.dir) as workdir:
        res = run(args.preset, workdir, args.repeats)
    print(f"\n{args.preset}: {res['state_bytes'] / 1e9:.2f} GB of state, median of {args.repeats}; {res['machine']}")
    print(f"{'part':58s}{'wall s':>8s}{'CPU s':>8s}{'faults':>10s}")
    for name, m in res["median"].items():
        print(f"{name:58s}{m['wall_s']:8.2f}{m['cpu_s']:8.2f}{m['minor_faults']:10.0f}")
    for name, g in res["gil_while_writing_on_a_thread"].items():
        print(f"GIL, {name} writer on a thread: longest main-thread stall {g['longest_stall_ms']:.1f} ms, "
              f"{g['stalled_s']:.2f} s in stalls over 1 ms")
    print("host RAM for staging: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in res["staging_bytes_per_preset"].items()))
    write_results(args.output, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
