"""What a run shows: Accelerate trackers (TensorBoard first), metrics.jsonl, train.log, a progress bar.

Everything here runs on the main process only (Accelerate's trackers already are main-process-only).
Scalars are named by group (``train/``, ``perf/``, ``eval/``, ``time/``) so TensorBoard groups them.
TensorBoard gets ``purge_step = start_step + 1`` at every start and metrics.jsonl is cut at the resumed
step, so curves continue after a resume without doubled points.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("hf_gpt2_train")


def log_with(report_to: str) -> list[str] | str | None:
    """--report_to value -> Accelerator(log_with=...)."""
    r = report_to.strip().lower()
    if r in ("", "none"):
        return None
    if r == "all":
        return "all"
    return [x.strip() for x in r.split(",") if x.strip()]


def setup_logging(output_dir: Path, is_main: bool) -> None:
    """Console + OUTPUT_DIR/train.log on the main process; warnings only elsewhere."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    log.addHandler(console)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(output_dir / "train.log")
        fh.setFormatter(fmt)
        log.addHandler(fh)


def _flat_hparams(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_hparams(v, f"{key}/"))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


class Tracker:
    """Logs scalars/text to the trackers, metrics.jsonl and the console; owns the progress bar."""

    def __init__(self, accelerator, output_dir: Path, run_name: str, run_info: dict[str, Any],
                 start_step: int, max_steps: int):
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.metrics_path = output_dir / "metrics.jsonl"
        self.max_steps = max_steps
        self.bar = None
        if self.is_main:
            self._truncate_metrics(start_step)
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            disable=not sys.stderr.isatty())
        # purge_step at every start, not only on resume: TensorBoard treats the first START event of a run
        # as the beginning, so a fresh run must write one for a later resume's purge to take effect.
        init_kwargs = {"tensorboard": {"purge_step": start_step + 1}}
        if accelerator.log_with:
            accelerator.init_trackers(run_name, config=_flat_hparams(run_info.get("config", {})),
                                      init_kwargs=init_kwargs)
            summary = json.dumps({k: v for k, v in run_info.items() if k != "config"}, indent=2, default=str)
            accelerator.log({"run/info": f"```\n{summary}\n```",
                             "run/config": f"```\n{json.dumps(run_info.get('config', {}), indent=2)}\n```"},
                            step=start_step)

    def _truncate_metrics(self, start_step: int) -> None:
        """Drop metrics logged after the step we resume from (they will be logged again)."""
        if not self.metrics_path.exists():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= start_step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        self.metrics_path.write_text("".join(x + "\n" for x in keep))

    def log(self, step: int, values: dict[str, Any], console: str | None = None) -> None:
        """Write values at step to trackers and metrics.jsonl (main process)."""
        if self.accelerator.log_with:
            self.accelerator.log(values, step=step)
        if not self.is_main:
            return
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")
        if console:
            log.info(console)

    def log_train(self, step: int, metrics: dict[str, float]) -> None:
        eta = metrics.get("time/eta_hours", math.nan)
        line = (f"step {step:>7}/{self.max_steps} | loss {metrics['train/loss']:.4f} | lr {metrics['train/lr']:.2e}"
                f" | norm {metrics['train/grad_norm']:.3f} | {metrics['perf/tokens_per_sec']:,.0f} tok/s"
                + (f" | mfu {100 * metrics['perf/mfu']:.1f}%" if "perf/mfu" in metrics else "")
                + f" | eta {eta:.2f} h")
        self.log(step, metrics, console=line)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", lr=f"{metrics['train/lr']:.1e}",
                                 tok_s=f"{metrics['perf/tokens_per_sec']:,.0f}", eta_h=f"{eta:.2f}")

    def log_eval(self, step: int, metrics: dict[str, float], samples: list[str]) -> None:
        parts = " | ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in metrics.items())
        values: dict[str, Any] = dict(metrics)
        if samples:
            values["eval/samples"] = "\n\n".join(f"    {s}" for s in samples)
        self.log(step, values, console=f"eval @ {step} | {parts}")
        for s in samples:
            log.info("sample: %r", s)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def finish(self) -> None:
        """Close the progress bar. The trackers are closed by ``accelerator.end_training()``, which the trainer
        calls last of all: it also destroys the process group, so nothing distributed may follow it."""
        if self.bar is not None:
            self.bar.close()


class StepTimer:
    """Throughput over a logging interval; only read at logging steps (after a device sync)."""

    def __init__(self, start_step: int):
        self.t = time.perf_counter()
        self.step = start_step

    def lap(self, step: int) -> tuple[float, int]:
        """Seconds per step since the last lap, and the number of steps in it."""
        now = time.perf_counter()
        n = max(1, step - self.step)
        dt = (now - self.t) / n
        self.t, self.step = now, step
        return dt, n
