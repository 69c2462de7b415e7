"""What a run shows: Accelerate trackers (TensorBoard first), metrics.jsonl, train.log, a progress bar.

Everything here runs on the main process only (Accelerate's trackers already are main-process-only).
Scalars are named by group (``train/``, ``perf/``, ``eval/``, ``time/``) so TensorBoard groups them.
TensorBoard gets ``purge_step = start_step + 1`` at every start and metrics.jsonl is cut at the resumed
step, so curves continue after a resume without doubled points. Every start of a run writes into the one
folder ``runs/<run_name>`` (the hyperparameters go into that run itself, once, not into Accelerate's
timestamp-named sub-run).

In a terminal, log lines go through the progress bar (``tqdm.write``): each prints on its own line above
the live bar. Without a terminal (a file, CI) there is no bar, only the log lines.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import platform
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("hf_gpt2_train")

# Final metrics the TensorBoard HParams tab shows next to the run's hyperparameters (their last values).
HPARAM_METRICS = ("eval/val_loss", "eval/hellaswag_acc_norm", "train/loss")


def log_with(report_to: str) -> list[str] | str | None:
    """--report_to value -> Accelerator(log_with=...)."""
    r = report_to.strip().lower()
    if r in ("", "none"):
        return None
    if r == "all":
        return "all"
    return [x.strip() for x in r.split(",") if x.strip()]


class ConsoleHandler(logging.StreamHandler):
    """A StreamHandler that writes through ``tqdm.write``: with a live progress bar the bar is cleared, the
    line printed on its own and the bar redrawn below it; with no bar it is a plain line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:
            self.handleError(record)


def setup_logging(output_dir: Path, is_main: bool) -> None:
    """Console + OUTPUT_DIR/train.log on the main process; warnings only elsewhere."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = ConsoleHandler(sys.stdout)
    console.setFormatter(fmt)
    log.addHandler(console)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(output_dir / "train.log")
        fh.setFormatter(fmt)
        log.addHandler(fh)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else platform's best guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def hardware(device_type: str, world_size: int) -> tuple[str, str]:
    """(device name, hardware line): ('NVIDIA H100 80GB HBM3', 'NVIDIA H100 80GB HBM3 x 8') on GPUs (one per
    process), ('AMD EPYC', 'CPU: AMD EPYC, 2 processes') on CPUs."""
    if device_type == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        return name, f"{name} x {world_size}"
    name = cpu_model()
    return name, f"CPU: {name}, {world_size} process{'es' if world_size != 1 else ''}"


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


def _write_tensorboard_hparams(writer: Any, hparams: dict[str, Any]) -> None:
    """The HParams tab entry, written into the run's own folder (``SummaryWriter.add_hparams``, which
    Accelerate's ``store_init_configuration`` calls, writes a new timestamp-named run instead)."""
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    file_writer = writer._get_file_writer()
    for summary in hparams_summary(hparams, dict.fromkeys(HPARAM_METRICS, 0.0)):
        file_writer.add_summary(summary)
    writer.flush()


def _longest_run(text: str, char: str) -> int:
    return max((len(m) for m in re.findall(re.escape(char) + "+", text)), default=0)


def sample_markdown(prompt: str, continuation: str) -> str:
    """One generated sample as one Markdown block: the prompt in inline code, then the continuation verbatim
    in a fenced code block (fences longer than any backtick run inside, so no text can close them early)."""
    tick = "`" * (_longest_run(prompt, "`") + 1)
    pad = " " if prompt.startswith("`") or prompt.endswith("`") or not prompt.strip() else ""
    fence = "`" * max(3, _longest_run(continuation, "`") + 1)
    return f"**prompt** {tick}{pad}{prompt}{pad}{tick} **continues:**\n\n{fence}text\n{continuation}\n{fence}"


def samples_markdown(samples: list[str], prompts: list[str]) -> str:
    """The ``eval/samples`` text: the evaluator's ``"prompt -> continuation"`` lines, one Markdown block each."""
    blocks = []
    for i, s in enumerate(samples):
        p = prompts[i] if i < len(prompts) else ""
        prompt, continuation = (p, s[len(p) + 4:]) if p and s.startswith(f"{p} -> ") else ("", s)
        blocks.append(sample_markdown(prompt, continuation))
    return "\n\n".join(blocks)


class StepTimer:
    """Throughput over a logging interval, counting training time only; read at logging steps (after a sync).

    ``with timer.paused("eval"):`` around evaluation and checkpoint calls takes their time out of the
    interval; ``last[kind]`` is the duration of the latest pause of that kind and ``paused_total`` the
    seconds paused since this process started (for the ETA's share of eval/save time).
    """

    def __init__(self, start_step: int, bar: Any = None):
        self.t = time.perf_counter()
        self.step = start_step
        self.start_step = start_step
        self.bar = bar
        self.last: dict[str, float] = {}
        self.paused_total = 0.0

    @contextlib.contextmanager
    def paused(self, kind: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.t += dt  # the interval's clock skips the pause
            self.last[kind] = dt
            self.paused_total += dt
            if self.bar is not None and hasattr(self.bar, "last_print_t"):
                self.bar.last_print_t += dt  # and so does the bar's rate (its elapsed time stays wall time)

    def lap(self, step: int) -> tuple[float, int]:
        """Seconds of training per step since the last lap, and the number of steps in it."""
        now = time.perf_counter()
        n = max(1, step - self.step)
        dt = (now - self.t) / n
        self.t, self.step = now, step
        return dt, n

    def restart(self, step: int) -> None:
        """Start a new interval at ``step`` (after an in-process rollback moved the step counter back)."""
        self.t, self.step, self.start_step, self.paused_total = time.perf_counter(), step, step, 0.0

    def overhead_per_step(self, step: int) -> float:
        """Seconds of eval/checkpoint time per training step so far in this process (the ETA adds it)."""
        return self.paused_total / max(1, step - self.start_step)


class Tracker:
    """Logs scalars/text to the trackers, metrics.jsonl and the console; owns the progress bar and the timer.

    ``start_tokens``/``tokens_per_step`` give each metrics.jsonl line its cumulative ``tokens``.
    """

    def __init__(self, accelerator, output_dir: Path, run_name: str, run_info: dict[str, Any],
                 start_step: int, max_steps: int, start_tokens: int = 0, tokens_per_step: int = 0):
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.metrics_path = output_dir / "metrics.jsonl"
        self.max_steps = max_steps
        self.start_step, self.start_tokens, self.tokens_per_step = start_step, start_tokens, tokens_per_step
        self.prompts = list(((run_info.get("config") or {}).get("eval") or {}).get("sample_prompts") or [])
        self.bar = None
        if self.is_main:
            self._truncate_metrics(start_step)
            if start_step > 0:  # a resume point, for the model card's loss plot
                self._append({"step": start_step, "tokens": start_tokens, "event": "resume",
                              "from": run_info.get("resumed_from")})
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            disable=not sys.stderr.isatty())
        self.timer = StepTimer(start_step, self.bar)
        # purge_step at every start, not only on resume: TensorBoard treats the first START event of a run
        # as the beginning, so a fresh run must write one for a later resume's purge to take effect.
        init_kwargs = {"tensorboard": {"purge_step": start_step + 1}}
        if accelerator.log_with:
            # config=None: Accelerate's TensorBoard tracker would add_hparams into a new timestamped run.
            accelerator.init_trackers(run_name, config=None, init_kwargs=init_kwargs)
            self._store_config(_flat_hparams(run_info.get("config", {})), fresh=start_step == 0)
            summary = json.dumps({k: v for k, v in run_info.items() if k != "config"}, indent=2, default=str)
            accelerator.log({"run/info": f"```\n{summary}\n```",
                             "run/config": f"```\n{json.dumps(run_info.get('config', {}), indent=2)}\n```"},
                            step=start_step)

    def _store_config(self, hparams: dict[str, Any], fresh: bool) -> None:
        for t in self.accelerator.trackers:
            if t.name == "tensorboard":
                if fresh and self.is_main:  # once per run: a resume continues the same HParams entry
                    _write_tensorboard_hparams(t.tracker, hparams)
            else:
                t.store_init_configuration(hparams)

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

    def _append(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def tokens_at(self, step: int) -> int:
        return self.start_tokens + (step - self.start_step) * self.tokens_per_step

    def log(self, step: int, values: dict[str, Any], console: str | None = None) -> None:
        """Write values at step to trackers and metrics.jsonl (main process)."""
        if self.accelerator.log_with:
            self.accelerator.log(values, step=step)
        if not self.is_main:
            return
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars:
            self._append({"step": step, "tokens": self.tokens_at(step), **scalars})
        if console:
            log.info(console)

    def log_train(self, step: int, metrics: dict[str, float]) -> None:
        eta = metrics.get("time/eta_hours", math.nan)
        line = (f"step {step:>7}/{self.max_steps} | loss {metrics['train/loss']:.4f} | lr {metrics['train/lr']:.2e}"
                f" | norm {metrics['train/grad_norm']:.3f} | {metrics['perf/tokens_per_sec']:,.0f} tok/s"
                + (f" | mfu {100 * metrics['perf/mfu']:.1f}%" if "perf/mfu" in metrics else "")
                + f" | eta {eta:.2f} h")
        self.log(step, metrics, console=line)
        if self.bar is not None:  # fixed order; the bar has its own ETA
            self.bar.set_postfix_str(f"loss={metrics['train/loss']:.3f}, tok/s={metrics['perf/tokens_per_sec']:,.0f}, "
                                     f"lr={metrics['train/lr']:.1e}")

    def log_eval(self, step: int, metrics: dict[str, float], samples: list[str]) -> None:
        """Eval scalars, ``time/eval_seconds`` (the timer's last "eval" pause) and the samples."""
        values: dict[str, Any] = dict(metrics)
        if "eval" in self.timer.last:
            values["time/eval_seconds"] = self.timer.last["eval"]
        if samples:
            values["eval/samples"] = samples_markdown(samples, self.prompts)
        parts = " | ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in metrics.items())
        self.log(step, values, console=f"eval @ {step} | {parts}")
        for s in samples:
            log.info("sample: %r", s)

    def log_checkpoint(self, step: int) -> None:
        """``time/checkpoint_seconds``: how long the loop waited on the checkpoint call of this step."""
        self.log(step, {"time/checkpoint_seconds": self.timer.last.get("checkpoint", 0.0)})

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close_bar(self) -> None:
        """Close the bar (idempotent), so whatever prints next (an error line) starts on a clean line."""
        if self.bar is not None:
            self.bar.close()
            self.bar = self.timer.bar = None

    @contextlib.contextmanager
    def bar_closed_on_error(self) -> Iterator[None]:
        """Around the loop: an exception closes the bar first, so its one-line error prints on a line of its own."""
        try:
            yield
        except BaseException:
            self.close_bar()
            raise

    def finish(self) -> None:
        """Close the progress bar. The trackers are closed by ``accelerator.end_training()``, which the trainer
        calls last of all: it also destroys the process group, so nothing distributed may follow it."""
        self.close_bar()
