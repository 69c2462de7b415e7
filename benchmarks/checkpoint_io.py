"""Checkpoint save/load time of a GPT-2 training state: CheckpointManager vs plain torch.save + fsync.

Both sides handle the same tensors (model weights + AdamW state after one real step) on the same
filesystem, interleaved in one run so that disk and CPU conditions are shared:

* ours, save: ``CheckpointManager.maybe_save`` = ``accelerator.save_state`` into a temp folder, fsync of
  every file and folder, sha256 of every file, manifest, rename into ``latest`` + hard-linked
  ``step_NNNNNNN``, rotation.
* ours, load: ``resolve_resume("latest")`` + ``load`` = size check, ``accelerator.load_state`` with the sha256
  verification running alongside; also measured without sha256 (``--no_verify_checkpoint``). sha256 is
  sequential within a file, so verified loads cannot beat one core's sha256 speed on ``optimizer.bin``.
* baseline, save: ``torch.save({"model", "optimizer"}, f)`` + flush + fsync of the file and its folder.
* baseline, load: ``torch.load`` + ``model.load_state_dict`` + ``optimizer.load_state_dict``.

Usage: ``python benchmarks/checkpoint_io.py [--preset gpt2] [--dir PATH] [--repeats 3] [--output FILE.json]``.
Prints the median times and the ratios (target: ours at most 1.3x the baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


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


def run(preset: str, workdir: Path, repeats: int) -> dict[str, Any]:
    from accelerate import Accelerator

    from hf_gpt2_train.checkpoint import CheckpointManager
    from hf_gpt2_train.config import CheckpointConfig, build_config
    from hf_gpt2_train.model import build_model, lm_logits, lm_loss
    from hf_gpt2_train.state import TrainerState

    cfg = build_config(preset=preset, cli={"output_dir": str(workdir / "run")})
    acc = Accelerator(cpu=True)
    model = build_model(cfg.model, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model, opt = acc.prepare(model, opt)
    x = torch.randint(0, cfg.model.vocab_size, (1, 65))
    acc.backward(lm_loss(lm_logits(model, x[:, :-1], cfg.model.vocab_size), x[:, 1:]))  # real AdamW state
    opt.step()
    opt.zero_grad(set_to_none=True)
    state = TrainerState()
    acc.register_for_checkpointing(state)
    acc.register_for_checkpointing(_Position())
    ckpt_cfg = CheckpointConfig(checkpoint_steps=1, keep_last=1)
    mgr = CheckpointManager(acc, ckpt_cfg, workdir / "run", {"config": cfg.to_dict(), "effective_precision": "no"})
    baseline_file = workdir / "baseline" / "state.pt"
    baseline_file.parent.mkdir(parents=True, exist_ok=True)

    def ours_save() -> None:
        state.step += 1
        mgr.maybe_save(state)

    def base_save() -> None:
        with open(baseline_file, "wb") as f:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(baseline_file.parent)

    def ours_load() -> None:
        ckpt_cfg.verify_checkpoint = True
        mgr.load(mgr.resolve_resume("latest"))

    def ours_load_sizes_only() -> None:
        ckpt_cfg.verify_checkpoint = False
        mgr.load(mgr.resolve_resume("latest"))

    def base_load() -> None:
        sd = torch.load(baseline_file, map_location="cpu", weights_only=True)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optimizer"])

    times: dict[str, list[float]] = {"ours_save": [], "baseline_save": [], "ours_load": [],
                                     "ours_load_no_sha256": [], "baseline_load": []}
    for i in range(repeats):
        pairs = [("ours_save", ours_save), ("baseline_save", base_save), ("ours_load", ours_load),
                 ("ours_load_no_sha256", ours_load_sizes_only), ("baseline_load", base_load)]
        if i % 2:  # alternate who goes first so neither always meets a warmer/colder page cache
            pairs = [pairs[1], pairs[0], pairs[4], pairs[3], pairs[2]]
        for name, fn in pairs:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            print(f"  run {i + 1}: {name:20s} {times[name][-1]:7.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ckpt = workdir / "run" / "checkpoints" / "latest"
    return {
        "preset": preset,
        "params": sum(p.numel() for p in model.parameters()),
        "checkpoint_bytes": sum(p.stat().st_size for p in ckpt.iterdir()),
        "baseline_bytes": baseline_file.stat().st_size,
        "repeats": repeats,
        "times_s": times,
        "median_s": med,
        "save_ratio": med["ours_save"] / med["baseline_save"],
        "load_ratio": med["ours_load"] / med["baseline_load"],
        "load_ratio_no_sha256": med["ours_load_no_sha256"] / med["baseline_load"],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="gpt2", help="Model preset (default gpt2, 124M).")
    ap.add_argument("--dir", default="", help="Folder to write in (default: a temp folder in the current directory, "
                    "so both sides use the filesystem checkpoints normally go to). Removed afterwards.")
    ap.add_argument("--repeats", type=int, default=3, help="Saves/loads per side; medians are reported.")
    ap.add_argument("--output", default="", help="Also write the results as JSON to this file.")
    args = ap.parse_args(argv)
    base = Path(args.dir) if args.dir else Path.cwd()
    base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=base))
    try:
        res = run(args.preset, workdir, args.repeats)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    m = res["median_s"]
    print(f"\n{args.preset}: {res['params'] / 1e6:.0f}M params, checkpoint {res['checkpoint_bytes'] / 1e9:.2f} GB "
          f"(baseline file {res['baseline_bytes'] / 1e9:.2f} GB), median of {args.repeats}")
    rows = [("save", m["ours_save"], m["baseline_save"], res["save_ratio"]),
            ("load (sha256 verified)", m["ours_load"], m["baseline_load"], res["load_ratio"]),
            ("load (sizes only)", m["ours_load_no_sha256"], m["baseline_load"], res["load_ratio_no_sha256"])]
    print(f"{'':24s}{'ours':>8s}{'torch.save/load':>17s}{'ratio':>8s}  target <= 1.3x")
    for name, ours, base, ratio in rows:
        print(f"{name:24s}{ours:7.2f}s{base:16.2f}s{ratio:7.2f}x  {'met' if ratio <= 1.3 else 'NOT met'}")
    if args.output:
        Path(args.output).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
