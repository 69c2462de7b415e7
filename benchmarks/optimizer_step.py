"""Step time of Muon vs AdamW on the same model and batches, in one run: what Newton-Schulz costs.

Two training loops (``hf_gpt2_train.bench.PlainLoop``: the model, training forward, precision, accumulation and
clipping of a run) are built from one configuration, one with ``--optimizer adamw`` and one with ``--optimizer
muon``; after ``--warmup`` untimed steps each they alternate step by step (adamw, muon, muon, adamw, ...) for
``--repeats`` timed steps each, so drift of a shared machine hits both alike. For each: the median full step
time and the median time inside ``optimizer.step()`` (step pre/post hooks, synchronised on CUDA), and their
ratios muon / adamw.

Usage: ``python benchmarks/optimizer_step.py --preset gpt2 --per_device_train_batch_size 1 --seq_len 1024
--total_batch_size 1024 --output docs/bench/optimizer_step.json`` (every training config flag works;
``--precision bf16`` autocasts like a bf16 run). Without ``--preset``: gpt2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hf_gpt2_train.bench import PlainLoop  # noqa: E402
from hf_gpt2_train.cli import add_config_flags, config_from_args  # noqa: E402
from hf_gpt2_train.config import Config, PrecisionConfig  # noqa: E402
from hf_gpt2_train.data.loader import TrainLoader, resolve_data_dir  # noqa: E402
from hf_gpt2_train.precision import detect_device_type, plan_precision  # noqa: E402
from hf_gpt2_train.tracking import cpu_model  # noqa: E402

OWN_ARGS = ("repeats", "warmup", "output", "precision")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timed:
    """One loop and the time its optimizer.step() takes (hooks around it)."""

    def __init__(self, loop: PlainLoop, device: torch.device):
        self.loop, self.device = loop, device
        self.step_s: list[float] = []
        self.opt_s: list[float] = []
        self._t0 = 0.0
        loop.optimizer.register_step_pre_hook(self._pre)
        loop.optimizer.register_step_post_hook(self._post)

    def _pre(self, *_: Any) -> None:
        _sync(self.device)
        self._t0 = time.perf_counter()

    def _post(self, *_: Any) -> None:
        _sync(self.device)
        self.last_opt = time.perf_counter() - self._t0

    def step(self, record: bool) -> None:
        _sync(self.device)
        t0 = time.perf_counter()
        self.loop.train_step()
        _sync(self.device)
        if record:
            self.step_s.append(time.perf_counter() - t0)
            self.opt_s.append(self.last_opt)

    def summary(self) -> dict[str, Any]:
        return {"step_ms": 1000 * statistics.median(self.step_s), "optimizer_step_ms": 1000 * statistics.median(
            self.opt_s), "step_ms_all": [round(1000 * s, 2) for s in self.step_s],
            "optimizer_step_ms_all": [round(1000 * s, 2) for s in self.opt_s]}


def measure(cfg: Config, precision: str, repeats: int, warmup: int) -> dict[str, Any]:
    device_type = detect_device_type()
    plan = plan_precision(PrecisionConfig(mixed_precision=precision), device_type)
    device = torch.device(device_type)
    compile_model = cfg.run.compile if cfg.run.compile is not None else device_type == "cuda"
    accum = cfg.grad_accum_steps(1)
    loops = {}
    for name in ("adamw", "muon"):
        c = Config.from_dict(cfg.to_dict())
        c.optim.optimizer = name
        loader = TrainLoader(resolve_data_dir(c.data), c.optim.seq_len, c.optim.per_device_train_batch_size, 0, 1,
                             c.run.seed, c.data.shuffle, pin_memory=device_type == "cuda")
        loops[name] = Timed(PlainLoop(c, plan, loader, accum, device, compile_model), device)
    for _ in range(warmup):
        for t in loops.values():
            t.step(record=False)
    for r in range(repeats):
        for name in (("adamw", "muon") if r % 2 == 0 else ("muon", "adamw")):
            loops[name].step(record=True)
    a, m = loops["adamw"].summary(), loops["muon"].summary()
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device_type == "cuda" else f"{cpu_model()}, "
                  f"{torch.get_num_threads()} threads",
        "command": shlex.join([sys.executable, *sys.argv]), "torch": torch.__version__,
        "preset": cfg.preset, "model": dict(vars(cfg.model)), "precision": plan.effective, "compile": compile_model,
        "tokens_per_step": cfg.optim.total_batch_size, "micro_batch_size": cfg.optim.per_device_train_batch_size,
        "seq_len": cfg.optim.seq_len, "grad_accum_steps": accum, "repeats": repeats, "warmup": warmup,
        "newton_schulz_dtype": str(loops["muon"].loop.optimizer.ns_dtype).removeprefix("torch."),
        "adamw": a, "muon": m, "step_time_ratio": m["step_ms"] / a["step_ms"],
        "optimizer_step_ratio": m["optimizer_step_ms"] / a["optimizer_step_ms"],
        "muon_extra_ms_per_step": m["step_ms"] - a["step_ms"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per optimizer (alternating)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per optimizer first")
    p.add_argument("--precision", default="no", help="no (fp32) or bf16 (autocast, as a bf16 run)")
    p.add_argument("--output", default="", help="write the JSON here")
    add_config_flags(p)
    args = p.parse_args(argv)
    rest = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in OWN_ARGS})
    if not getattr(rest, "preset", "") and not getattr(rest, "config", ""):
        rest.preset = "gpt2"
    cfg = config_from_args(rest)
    cfg.validate(world_size=1)
    doc = measure(cfg, args.precision, args.repeats, args.warmup)
    print(f"{doc['device']}, {doc['preset']}, {doc['precision']}, {doc['tokens_per_step']:,} tokens/step: "
          f"AdamW {doc['adamw']['step_ms']:.0f} ms/step (optimizer {doc['adamw']['optimizer_step_ms']:.1f} ms), "
          f"Muon {doc['muon']['step_ms']:.0f} ms/step (optimizer {doc['muon']['optimizer_step_ms']:.1f} ms): "
          f"{doc['step_time_ratio']:.3f}x the step time")
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
