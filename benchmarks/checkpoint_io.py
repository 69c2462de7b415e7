"""Checkpoint I/O of a GPT-2 training state: CheckpointManager (synchronous and asynchronous) vs plain torch.save.

All sides handle the same tensors (model weights + AdamW state after real steps) on the same filesystem,
interleaved in one run so that disk and CPU conditions are shared:

* sync save: ``CheckpointManager.maybe_save`` with ``--async_checkpoint false`` = the files ``save_state``
  writes, fsync of every file and folder, checksums (xxh3_128, chunked, on all cores), manifest, rename into ``latest`` +
  hard-linked ``step_NNNNNNN``, rotation.
* async save: the same manager with ``--async_checkpoint true`` (the default on a GPU), followed by one training step
  as in the loop: ``blocked`` is the time ``maybe_save`` keeps the loop (the small files, starting the host
  copy) plus the time that step's optimizer step waits for the host copy to finish; ``background`` the time
  from the return of ``maybe_save`` until the save is on disk. The first asynchronous save, which allocates
  the host buffers, is reported apart.
* worst-case graceful stop: a stop signal arriving while an asynchronous save is being written: the stop
  save waits for it, then writes ``latest`` durably. This is the time a launcher must allow between SIGTERM and
  SIGKILL (``torchrun --shutdown_timeout``, Slurm ``--signal``), plus one training step.
* loads: ``resolve_resume("latest")`` + ``load`` = size check + ``accelerator.load_state`` with the chunked
  checksum verification in parallel threads; also sizes only (``--no_verify_checkpoint``).
* baseline: ``torch.save({"model", "optimizer"}, f)`` + flush + fsync of the file and its folder;
  ``torch.load`` + ``model.load_state_dict`` + ``optimizer.load_state_dict``.
* the loop's view: wall time of ``--loop_steps`` real training steps with a save every ``--save_every`` steps,
  synchronous vs asynchronous vs no saves (the last asynchronous save is waited for inside the timing).

Usage: ``python benchmarks/checkpoint_io.py [--preset gpt2] [--dir PATH] [--repeats 3] [--output FILE.json]``.
Targets: verified load <= 1.3x the baseline load; blocked time per async save <= 15% of the sync save.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from results import add_folder_args, scratch_folder, stamp, write_results  # benchmarks/ is first on sys.path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Position:
    """Stands for the train loader's registered state (a global token position)."""

    def __init__(self) -> None:
        self.pos = 0

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos}

    def load_state_dict(self, d: dict[str, int]) -> None:
        self.pos = d["pos"]


def loop_view(train_step: Any, state: Any, steps: Any, managers: dict[str, Any], loop_steps: int, save_every: int,
              repeats: int, train_threads: int) -> dict[str, Any]:
    """The loop's view: ``loop_steps`` real training steps with a save every ``save_every`` (modes: no saves,
    synchronous, asynchronous), ``repeats`` times in rotating order; wall time per run (the last background
    write waited for inside it) and every step's time, with whether a background write was in flight when the
    step began (the host copy, the write or the seal)."""
    threads = torch.get_num_threads()
    if train_threads:
        torch.set_num_threads(train_threads)
    modes = ["none", "sync", "async"]
    wall: dict[str, list[float]] = {m: [] for m in modes}
    step_s: dict[str, list[float]] = {"none": [], "sync": [], "async_in_flight": [], "async_idle": []}
    try:
        for r in range(repeats):
            for mode in modes[r % 3:] + modes[:r % 3]:
                mgr = managers.get(mode)
                t0 = time.perf_counter()
                for s in range(1, loop_steps + 1):
                    busy = mgr is not None and mgr.writer.running
                    t = time.perf_counter()
                    train_step()
                    took = time.perf_counter() - t
                    step_s["async_in_flight" if busy else "async_idle" if mode == "async" else mode].append(took)
                    if mgr is not None and s % save_every == 0:
                        state.step = next(steps)
                        mgr.maybe_save(state)
                if mgr is not None:
                    mgr.wait()  # the last background write counts too
                wall[mode].append(time.perf_counter() - t0)
                print(f"  loop: {loop_steps} steps, a save every {save_every} ({mode}): {wall[mode][-1]:.1f}s", flush=True)
    finally:
        torch.set_num_threads(threads)
    if not repeats:
        return {}
    med = {m: statistics.median(v) for m, v in wall.items()}
    step_med = {k: statistics.median(v) if v else None for k, v in step_s.items()}
    in_flight = step_med["async_in_flight"]
    return {"repeats": repeats, "train_threads": train_threads or threads, "wall_s": wall, "median_wall_s": med,
            "sync_overhead_s": med["sync"] - med["none"], "async_overhead_s": med["async"] - med["none"],
            "async_vs_sync_overhead": (med["async"] - med["none"]) / (med["sync"] - med["none"])
            if med["sync"] > med["none"] else None,
            "step_s": step_s, "median_step_s": step_med,
            "step_in_flight_ratio": in_flight / step_med["none"] if in_flight else None}


@dataclass
class TrainingState:
    """A CPU training setup whose state is saved as the trainer's is: model, fused AdamW, TrainerState and a
    loader position registered with the Accelerator; ``train_step`` trains one sequence of random tokens."""

    acc: Any
    model: Any
    opt: Any
    state: Any
    train_step: Callable[[], None]
    info: dict[str, Any]  # run_info for a CheckpointManager


def training_state(preset: str, tokens: int, output_dir: Path) -> TrainingState:
    from accelerate import Accelerator

    from hf_gpt2_train.config import build_config
    from hf_gpt2_train.model import build_model, lm_logits, lm_loss
    from hf_gpt2_train.state import TrainerState

    cfg = build_config(preset=preset, cli={"output_dir": str(output_dir)})
    acc = Accelerator(cpu=True)
    model = build_model(cfg.model, seed=0)
    model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True))
    gen = torch.Generator().manual_seed(0)

    def train_step() -> None:
        x = torch.randint(0, cfg.model.vocab_size, (1, tokens + 1), generator=gen)
        acc.backward(lm_loss(lm_logits(model, x[:, :-1], cfg.model.vocab_size), x[:, 1:]))
        opt.step()
        opt.zero_grad(set_to_none=True)

    state = TrainerState()
    acc.register_for_checkpointing(state)
    acc.register_for_checkpointing(_Position())
    return TrainingState(acc, model, opt, state, train_step, {"config": cfg.to_dict(), "effective_precision": "no"})


def run(preset: str, workdir: Path, repeats: int, loop_steps: int, save_every: int, tokens: int,
        parts: set[str], train_threads: int = 0, loop_repeats: int = 1) -> dict[str, Any]:
    from hf_gpt2_train.checkpoint import CheckpointManager
    from hf_gpt2_train.checkpoint.atomic import CHECKSUM
    from hf_gpt2_train.config import CheckpointConfig

    t = training_state(preset, tokens, workdir / "run")
    acc, model, opt, state, train_step, info = t.acc, t.model, t.opt, t.state, t.train_step, t.info
    train_step()  # real AdamW state

    def manager(name: str, asynchronous: bool) -> CheckpointManager:
        c = CheckpointConfig(checkpoint_steps=1, keep_last=1, async_checkpoint=asynchronous)
        return CheckpointManager(acc, c, workdir / name, info)

    sync_mgr, async_mgr = manager("sync", False), manager("async", True)
    baseline_file = workdir / "baseline" / "state.pt"
    baseline_file.parent.mkdir(parents=True, exist_ok=True)
    times: dict[str, list[float]] = {k: [] for k in ("sync_save", "async_blocked", "async_background",
                                                     "stop_with_save_in_flight", "baseline_save", "ours_load",
                                                     "ours_load_sizes_only", "baseline_load")}
    steps = iter(range(1, 1 << 30))  # every save gets a new step (loads below rewind TrainerState)

    def timed(name: str, fn: Any) -> float:
        t0 = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t0)
        return times[name][-1]

    def sync_save() -> None:
        state.step = next(steps)
        timed("sync_save", lambda: sync_mgr.maybe_save(state))

    def async_save() -> None:  # as in the loop: save, then the next step (its optimizer step waits for the copy)
        state.step = next(steps)
        blocked = timed("async_blocked", lambda: async_mgr.maybe_save(state))
        t0 = time.perf_counter()
        train_step()
        times["async_blocked"][-1] = blocked + async_mgr.capture.stage_wait_s
        async_mgr.wait()
        times["async_background"].append(time.perf_counter() - t0)

    def stop_in_flight() -> None:  # SIGTERM during the step after a save: wait for its write, save latest durably
        state.step = next(steps)
        async_mgr.maybe_save(state)
        train_step()
        state.step = next(steps)
        timed("stop_with_save_in_flight", lambda: async_mgr.maybe_save(state, force_latest=True))

    def base_save() -> None:
        def go() -> None:
            with open(baseline_file, "wb") as f:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(baseline_file.parent)
        timed("baseline_save", go)

    def ours_load(verify: bool) -> None:
        sync_mgr.cfg.verify_checkpoint = verify
        timed("ours_load" if verify else "ours_load_sizes_only", lambda: sync_mgr.load(sync_mgr.resolve_resume("latest")))

    def base_load() -> None:
        def go() -> None:
            sd = torch.load(baseline_file, map_location="cpu", weights_only=True)
            model.load_state_dict(sd["model"])
            opt.load_state_dict(sd["optimizer"])
        timed("baseline_load", go)

    async_save()  # warm-up: the first asynchronous save allocates the host buffers (reported apart)
    first_async = {"blocked_s": times["async_blocked"].pop(), "background_s": times["async_background"].pop()}
    for i in range(repeats if "saves" in parts else 0):  # saves, then loads (a load replaces the optimizer's
        saves = [sync_save, async_save, base_save]  # tensors: the next host copy allocates new buffers)
        for fn in saves[::-1] if i % 2 else saves:  # alternate who meets a warmer/colder page cache first
            fn()
        stop_in_flight()
        print(f"  save run {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items() if v), flush=True)
    if "saves" not in parts and "loads" in parts:
        sync_save()
        base_save()
    for i in range(repeats if "loads" in parts else 0):
        loads = [lambda: ours_load(True), lambda: ours_load(False), base_load]
        for fn in loads[::-1] if i % 2 else loads:
            fn()
        print(f"  load run {i + 1}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in
                                                  ("ours_load", "ours_load_sizes_only", "baseline_load")), flush=True)

    loop = loop_view(train_step, state, steps, {"sync": sync_mgr, "async": async_mgr}, loop_steps, save_every,
                     loop_repeats if "loop" in parts else 0, train_threads)
    med = {k: statistics.median(v) if v else float("nan") for k, v in times.items()}
    ckpt = workdir / "sync" / "checkpoints" / "latest"
    return {
        **stamp(torch.__version__),
        "preset": preset,
        "checksum": CHECKSUM,  # what saves record (docs/bench results without this key used sha256)
        "params": sum(p.numel() for p in model.parameters()),
        "checkpoint_bytes": sum(p.stat().st_size for p in ckpt.iterdir()) if ckpt.is_dir() else None,
        "baseline_bytes": baseline_file.stat().st_size if baseline_file.exists() else None,
        "repeats": repeats,
        "times_s": times,
        "first_async_save": first_async,
        "median_s": med,
        "sync_save_ratio": med["sync_save"] / med["baseline_save"],
        "blocked_fraction": med["async_blocked"] / med["sync_save"],
        "load_ratio": med["ours_load"] / med["baseline_load"],
        "load_ratio_sizes_only": med["ours_load_sizes_only"] / med["baseline_load"],
        "loop": {"steps": loop_steps, "save_every": save_every, "tokens_per_step": tokens, **loop},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="gpt2", help="Model preset (default gpt2, 124M).")
    add_folder_args(ap)
    ap.add_argument("--repeats", type=int, default=3, help="Saves/loads per side; medians are reported.")
    ap.add_argument("--loop_steps", type=int, default=12, help="Training steps of the loop's-view measurement.")
    ap.add_argument("--save_every", type=int, default=4, help="Save every N steps in the loop's-view measurement.")
    ap.add_argument("--loop_repeats", type=int, default=1, help="Runs of each loop's-view mode (rotating order); "
                    "medians are reported.")
    ap.add_argument("--tokens", type=int, default=32, help="Tokens per training step of the loop's view (1 sequence).")
    ap.add_argument("--parts", default="saves,loads,loop", help="What to measure (comma-separated).")
    ap.add_argument("--train_threads", type=int, default=0, help="torch threads for the loop's view (0: torch's "
                    "default). 1 on a 2-core machine leaves a core to the writer, as a GPU leaves the CPU to it.")
    args = ap.parse_args(argv)
    with scratch_folder("ckpt-bench-", args.dir) as workdir:
        res = run(args.preset, workdir, args.repeats, args.loop_steps, args.save_every, args.tokens,
                  set(args.parts.split(",")), args.train_threads, args.loop_repeats)
    m = res["median_s"]
    gb = {k: f"{res[k] / 1e9:.2f} GB" if res[k] else "-" for k in ("checkpoint_bytes", "baseline_bytes")}
    print(f"\n{args.preset}: {res['params'] / 1e6:.0f}M params, checkpoint {gb['checkpoint_bytes']} (baseline file "
          f"{gb['baseline_bytes']}), median of {args.repeats}; {res['machine']}")
    if not math.isnan(m["sync_save"]):
        print(f"{'':34s}{'ours':>8s}{'reference':>12s}{'ratio':>8s}  target")
    rows = [("save, synchronous", m["sync_save"], m["baseline_save"], res["sync_save_ratio"], "", None),
            ("save, async: loop blocked", m["async_blocked"], m["sync_save"], res["blocked_fraction"],
             "<= 0.15 of sync", 0.15),
            ("save, async: background write", m["async_background"], m["sync_save"],
             m["async_background"] / m["sync_save"], "", None),
            ("stop with a save in flight", m["stop_with_save_in_flight"], m["sync_save"],
             m["stop_with_save_in_flight"] / m["sync_save"], "", None),
            ("load (checksums verified)", m["ours_load"], m["baseline_load"], res["load_ratio"], "<= 1.3x", 1.3),
            ("load (sizes only)", m["ours_load_sizes_only"], m["baseline_load"], res["load_ratio_sizes_only"], "", None)]
    for name, ours, ref, ratio, target, bound in rows if not math.isnan(m["sync_save"]) else ():
        verdict = "" if bound is None or math.isnan(ratio) else (" met" if ratio <= bound else " NOT met")
        print(f"{name:34s}{ours:7.2f}s{ref:11.2f}s{ratio:7.2f}x  {target}{verdict}")
    lp = res["loop"]
    if lp.get("median_wall_s"):
        w, st = lp["median_wall_s"], lp["median_step_s"]
        ratio = lp["async_vs_sync_overhead"]
        print(f"loop: {lp['steps']} steps of {lp['tokens_per_step']} tokens, a save every {lp['save_every']}, "
              f"{lp['train_threads']} torch thread(s), median of {lp['repeats']}: "
              + ", ".join(f"{k} {v:.1f}s" for k, v in w.items())
              + f" (sync +{lp['sync_overhead_s']:.1f}s, async +{lp['async_overhead_s']:.1f}s: "
              f"{'-' if ratio is None else f'{ratio:.2f}'} of sync's; target <= 0.5)")
        if lp["step_in_flight_ratio"] is not None:
            print(f"step time: {1000 * st['none']:.0f} ms without saves, {1000 * st['async_in_flight']:.0f} ms while a "
                  f"background write is in flight ({lp['step_in_flight_ratio']:.3f}x; target <= 1.05x with one "
                  f"training thread and a spare core)")
    write_results(args.output, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
