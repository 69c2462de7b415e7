"""The device check behind scripts/gpu_check.sh: every GPU claim of issue 11 measured in one command.

Usage: python scripts/gpu_check.py OUT_DIR   (GPU_CHECK_DRY_RUN=1: the same steps on CPU at quickstart size)

GPU_CHECK_STEPS=env,memory_modes runs only the steps it names.
Each step runs in its own subprocesses with its own time cap inside one overall budget (GPU_CHECK_BUDGET_S,
default 480 s): a failing, crashing or overrunning step is recorded and the next one runs; a step that would
start with under 15 s of budget left is recorded as skipped. Writes OUT_DIR/gpu_check.json (every step's
status, wall time, commands and parsed results), OUT_DIR/gpu_check.md (a short summary) and OUT_DIR/gpu_check.log
(every command's output). Checkpoints and other working files go to GPU_CHECK_WORK_DIR (default: a temporary
folder), so OUT_DIR stays three small files. The package runs from this working tree (PYTHONPATH), never
installed; the GPU machine has no network, no `datasets` and (unless carried as a wheel) no torchao.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpu_check_memory import memory_modes_step  # scripts/ is sys.path[0] when this file runs
from gpu_check_muon import step_muon  # scripts/ is this script's folder, first on sys.path
from gpu_check_saves import step_saves
from gpu_check_summary import summary

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
DRY_RUN = os.environ.get("GPU_CHECK_DRY_RUN", "") not in ("", "0")
MIN_STEP_S = 15.0


class StepError(Exception):
    """A step's command failed: the message is what the JSON records."""


@dataclass
class Context:
    out: Path
    work: Path
    log: Any
    deadline: float = 0.0
    commands: list[str] = field(default_factory=list)
    env_info: dict[str, Any] = field(default_factory=dict)
    data_dir: Path | None = None
    """Shards made by the data step (None: it failed, and the runs use the embedded corpus)."""

    def data(self) -> list[str]:
        return ["--data_dir", str(self.data_dir)] if self.data_dir else []

    def run(self, argv: list[str], env: dict[str, str] | None = None, name: str = "") -> str:
        """Run one command of the current step (its output appended to the log); returns its output.
        Raises StepError on a non-zero exit, TimeoutError when the step's time is up (the process group is
        killed: torchrun/accelerate children included)."""
        self.commands.append(shlex.join(argv))
        remaining = self.deadline - time.monotonic()
        if remaining <= 1:
            raise TimeoutError("no time left in this step for: " + shlex.join(argv))
        self.log.write(f"\n$ {shlex.join(argv)}\n")
        self.log.flush()
        with tempfile.TemporaryFile("w+") as buf:
            proc = subprocess.Popen(argv, cwd=REPO, env={**base_env(), **(env or {})}, stdout=buf,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                rc = proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                buf.seek(0)
                self.log.write(buf.read())
                raise TimeoutError(f"{name or argv[0]} did not finish within the step's time cap") from None
            buf.seek(0)
            text = buf.read()
        self.log.write(text)
        self.log.flush()
        if rc != 0:
            raise StepError(f"{name or shlex.join(argv[:4])} exited {rc}: {_cause(text)}")
        return text


def _cause(text: str) -> str:
    """The lines of a failed command's output that say why (first error lines, then the tail)."""
    lines = [ln.rstrip() for ln in text.strip().splitlines()]
    hints = ("Error", "error:", "Exception", "No module named", "Traceback")
    noise = ("ChildFailedError", "errors.html", "error_file", "elastic/multiprocessing")
    causes = list(dict.fromkeys(ln for ln in lines if any(h in ln for h in hints) and not any(n in ln for n in noise)
                                and not ln.startswith("Traceback")))
    return "\n".join(causes[:4] + ["--- last lines:"] + lines[-8:])


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


_BLOCKER_DIR: Path | None = None


def base_env() -> dict[str, str]:
    """The package from this tree, offline Hugging Face libraries, unbuffered output; in a dry run also a
    sitecustomize that makes `datasets` absent, as it is on the GPU machine (find_spec says None, import fails)."""
    env = dict(os.environ)
    paths = [str(REPO)]
    if DRY_RUN and _BLOCKER_DIR is not None:
        paths.insert(0, str(_BLOCKER_DIR))
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _make_blocker(work: Path) -> Path:
    d = work / "absent_packages"
    d.mkdir(parents=True, exist_ok=True)
    (d / "sitecustomize.py").write_text('import sys\n\nsys.modules["datasets"] = None  # absent on the GPU machine\n')
    return d


def cli(*args: str) -> list[str]:
    return [PY, "-m", "hf_gpt2_train", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -------------------------------------------------------------------------------------------- sizes
# GPU: the real presets at micro-batch shapes a run uses, fewer tokens per step so that every step fits the budget.
# Dry run: the quickstart model everywhere (CPU, fp32), the smallest counts that still exercise each path.
if DRY_RUN:
    SMALL, LARGE = ["--preset", "quickstart"], ["--preset", "quickstart"]
    SMALL_BATCH = ["--per_device_train_batch_size", "8", "--total_batch_size", "1024"]  # 2 accumulation steps
    LARGE_BATCH = ["--per_device_train_batch_size", "8", "--total_batch_size", "512"]
    BENCH_TIMING = ["--steps", "1", "--warmup", "0", "--repeats", "1", "--compile", "false"]
    HALF = "no"  # what the dry run measures in place of bf16 (CPUs without bf16 instructions run it ~30x slower)
    FP8 = ["fp8-ao-emulated", "--fp8_min_dim", "16"]
    TRAIN = ["--preset", "quickstart", "--compile", "true"]
    TRAIN_STEPS, TRAIN_SAVE_AT = 6, 3
    TRAIN_BATCH = ["--per_device_train_batch_size", "8", "--total_batch_size", "1024", "--val_batches", "1"]
    CORPUS_CHARS, VAL_TOKENS = 300_000, 5_000
    FSDP_MODEL = ["--preset", "quickstart", "--per_device_train_batch_size", "8"]  # 2 processes x 8 x 64 = 1024
else:
    SMALL, LARGE = ["--preset", "gpt2"], ["--preset", "gpt2-large"]
    SMALL_BATCH = ["--total_batch_size", "131072"]  # micro-batch 64 x 1024: 2 accumulation steps
    LARGE_BATCH = ["--total_batch_size", "32768"]  # micro-batch 16 x 1024: 2 accumulation steps
    BENCH_TIMING = ["--steps", "3", "--warmup", "2", "--repeats", "3", "--compile", "true"]
    HALF = "bf16"
    FP8 = ["fp8-ao"]
    TRAIN = ["--preset", "gpt2"]  # compile: the GPU default (on)
    TRAIN_STEPS, TRAIN_SAVE_AT = 30, 15
    TRAIN_BATCH = ["--per_device_train_batch_size", "16", "--total_batch_size", "65536", "--val_batches", "4"]
    # ~7M tokens: 30 steps of 65,536 tokens stay inside one epoch (every epoch end saves a milestone checkpoint).
    CORPUS_CHARS, VAL_TOKENS = 24_000_000, 300_000
    FSDP_MODEL = ["--preset", "gpt2"]
FSDP_BATCH = ["--val_batches", "1"] if DRY_RUN else TRAIN_BATCH
# HellaSwag off: the GPU machine has no network and its file is not in the working tree.
RUN_FLAGS = ["--hellaswag", "false", "--logging_steps", "1", "--sample_max_new_tokens", "4" if DRY_RUN else "8"]
CAP_SCALE = 3.0 if DRY_RUN else 1.0  # CPU steps are slower than a GPU's; the overall budget still bounds them


# -------------------------------------------------------------------------------------------- steps
def step_env(ctx: Context) -> dict[str, Any]:
    out = ctx.run([PY, str(Path(__file__)), "--probe-env"], name="environment probe")
    info = json.loads(out.strip().splitlines()[-1])
    ctx.env_info.update(info)
    return info


def step_data(ctx: Context) -> dict[str, Any]:
    """Training text without network: this Python's standard library sources (one document per module) as
    .jsonl, tokenised by `prepare-data` into shards. Too small for this, the embedded corpus would end an epoch
    every few gpt2 steps, and every epoch end saves a milestone checkpoint (1.5 GB at gpt2)."""
    corpus, data = ctx.work / "corpus.jsonl", ctx.work / "data"
    ctx.run([PY, str(Path(__file__)), "--probe-corpus", str(corpus), str(CORPUS_CHARS)], name="write the corpus")
    ctx.run(cli("prepare-data", "--source", str(corpus), "--output_dir", str(data), "--val_tokens", str(VAL_TOKENS),
                "--no_progress"), name="prepare-data")
    manifest = json.loads((data / "manifest.json").read_text())
    ctx.data_dir = data
    return {"source": "this Python's standard library sources", "bytes": corpus.stat().st_size,
            "tokens": manifest["tokens"], "complete": manifest.get("complete")}


def _bench(ctx: Context, name: str, model: list[str], batch: list[str], precisions: str,
           extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """One bench run; its JSON is rewritten after each precision, so a step cut short keeps what was measured."""
    path = ctx.work / f"{name}.json"
    error = None
    try:
        ctx.run(cli("bench", *model, *batch, *ctx.data(), *BENCH_TIMING, "--precisions", precisions, *extra,
                    "--output", str(path)), name=f"bench {precisions}")
    except (StepError, TimeoutError) as e:
        if not path.exists():
            raise
        error = str(e)
    doc = json.loads(path.read_text())
    keep = ("effective_precision", "tokens_per_sec", "mfu", "step_time_ms", "peak_memory_gb", "overhead_ratio",
            "fp8_coverage", "peak_tflops", "compile", "skipped", "failed")
    rows = {}
    for prec, r in doc["precisions"].items():
        row = {k: r[k] for k in keep if k in r}
        if "plain" in r:
            row["plain"] = {k: r["plain"][k] for k in ("tokens_per_sec", "mfu", "step_time_ms", "peak_memory_gb")}
        rows[prec] = row
    result = {"device": doc["device"], "tokens_per_step": doc["tokens_per_step"],
              "micro_batch_size": doc["micro_batch_size"], "precisions": rows}
    missing = [p for p in precisions.split(",") if p not in rows]
    failed = [f"{p} failed: {r['failed']}" for p, r in rows.items() if "failed" in r]
    if error or failed or missing:
        result["error"] = "; ".join(([error] if error else []) + failed +
                                    ([f"not measured: {', '.join(missing)}"] if missing else []))
    return result


def _bench_step(step: str, model: list[str], batch: list[str]) -> Callable[[Context], dict[str, Any]]:
    # fp8-te is reported as skipped where TransformerEngine does not import.
    return lambda ctx: _bench(ctx, step, model, batch, ",".join([HALF, FP8[0], "fp8-te"]), tuple(FP8[1:]))


def step_bench_logits(ctx: Context) -> dict[str, Any]:
    """bf16 at gpt2 with the loss GEMM over the real 50257 rows (--padded_logits false), to compare with the
    padded default of bench_gpt2."""
    return _bench(ctx, "bench_logits_real", SMALL, SMALL_BATCH, HALF, ("--padded_logits", "false"))


def step_bench_fp8_lm_head(ctx: Context) -> dict[str, Any]:
    """fp8 (torchao) at gpt2 with lm_head in fp8 too (--fp8_lm_head true), to compare with bench_gpt2's fp8."""
    return _bench(ctx, "bench_fp8_lm_head", SMALL, SMALL_BATCH, FP8[0], (*FP8[1:], "--fp8_lm_head", "true"))


def _metrics(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def step_train_resume(ctx: Context) -> dict[str, Any]:
    """A real run that saves mid-way, then a second run resumed from that checkpoint: same losses after it."""
    full, resumed = ctx.work / "train_full", ctx.work / "train_resumed"
    common = [*TRAIN, *TRAIN_BATCH, *ctx.data(), *RUN_FLAGS, "--max_steps", str(TRAIN_STEPS),
              "--checkpoint_steps", str(TRAIN_SAVE_AT), "--eval_steps", str(TRAIN_SAVE_AT)]
    t0 = time.monotonic()
    ctx.run(cli("train", *common, "--output_dir", str(full)), name="uninterrupted run")
    t_full = time.monotonic() - t0
    ckpt = full / "checkpoints" / f"step_{TRAIN_SAVE_AT:07d}"
    ctx.run(cli("train", *common, "--output_dir", str(resumed), "--resume_from_checkpoint", str(ckpt)),
            name="resumed run")
    a, b = _metrics(full), _metrics(resumed)
    after = [s for s in sorted(a) if s > TRAIN_SAVE_AT]
    if sorted(b) != after:
        raise StepError(f"the resumed run logged steps {sorted(b)}, expected {after}")
    diffs = [abs(a[s] - b[s]) for s in after]
    info = json.loads((full / "run_info.json").read_text())
    tol = 0.0 if DRY_RUN else 2e-2  # CPU fp32 is deterministic; CUDA atomics (embedding backward) are not bitwise
    result = {"steps": TRAIN_STEPS, "resumed_at": TRAIN_SAVE_AT, "max_abs_loss_diff": max(diffs),
              "bitwise_equal": max(diffs) == 0.0, "tolerance": tol, "compile": info.get("compile"),
              "effective_precision": info.get("effective_precision"), "final_loss": a[max(a)],
              "first_loss": a[min(a)], "uninterrupted_run_s": round(t_full, 1)}
    if max(diffs) > tol:
        result["error"] = f"resumed losses differ from the uninterrupted run's by up to {max(diffs):.3g}"
    return result


def step_fsdp2(ctx: Context) -> dict[str, Any]:
    """FSDP2 for 10 steps with a save, then an export that transformers loads. GPU: Accelerate's own FSDP2 path
    (accelerate_configs/fsdp.yaml) on one GPU. Dry run: tests/fsdp_harness.py, which switches Accelerate's
    MULTI_CPU state to FSDP2 on 2 gloo processes (Accelerate enables FSDP only on GPU backends)."""
    run_dir, export_dir = ctx.work / "fsdp2", ctx.work / "fsdp2_export"
    args = ["train", *FSDP_MODEL, *FSDP_BATCH, *ctx.data(), *RUN_FLAGS, "--max_steps", "10", "--checkpoint_steps", "10",
            "--eval_steps", "10", "--output_dir", str(run_dir)]
    if DRY_RUN:
        argv = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                "-m", "tests.fsdp_harness", *args]
        ctx.run(argv, env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}, name="FSDP2 run (test harness)")
    else:
        argv = [PY, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/fsdp.yaml",
                "--num_processes", "1", "-m", "hf_gpt2_train", *args]
        ctx.run(argv, name="FSDP2 run")
    ctx.run(cli("export", str(run_dir / "checkpoints" / "final"), "--out", str(export_dir)), name="export")
    out = ctx.run([PY, str(Path(__file__)), "--probe-export", str(export_dir)], name="load the export")
    result = json.loads(out.strip().splitlines()[-1])
    result["train_losses"] = _metrics(run_dir)
    return result


STEPS: list[tuple[str, float, Callable[[Context], dict[str, Any]], str]] = [
    ("env", 45, step_env, "GPU, driver, torch/CUDA, fp8 backends, offline vocabulary, pinned batches"),
    ("data", 40, step_data, "training text without network: the Python stdlib sources, prepare-data"),
    ("bench_gpt2", 130, _bench_step("bench_gpt2", SMALL, SMALL_BATCH), "gpt2: ours vs plain, bf16 / fp8 ao / TE"),
    ("bench_gpt2_large", 120, _bench_step("bench_gpt2_large", LARGE, LARGE_BATCH), "gpt2-large: the same"),
    ("train_resume", 100, step_train_resume, f"{TRAIN_STEPS}-step train with compile, save, resume, same losses"),
    ("fsdp2", 80, step_fsdp2, "FSDP2, 10 steps, save, export loads in transformers"),
    ("saves", 150, lambda ctx: step_saves(ctx, py=PY, dry_run=DRY_RUN), "gpt2: what periodic saves cost a whole run, "
     "synchronous vs asynchronous (final save only, a save every 15 of 60 steps)"),
    ("bench_gpt2_real_vocab_logits", 45, step_bench_logits, "gpt2 bf16 with the loss GEMM over 50257 rows"),
    ("bench_gpt2_fp8_lm_head", 45, step_bench_fp8_lm_head, "gpt2 fp8 with lm_head in fp8 too"),
    ("memory_modes", 240, memory_modes_step(cli, HALF, StepError), "memory and step time per activation "
     "checkpointing mode and preset, largest micro-batch per 24/40/80 GB"),
    ("muon", 90, lambda ctx: step_muon(ctx, py=PY, dry_run=DRY_RUN, bench_model=SMALL, bench_batch=SMALL_BATCH,
                                       train_model=TRAIN, train_batch=TRAIN_BATCH, run_flags=RUN_FLAGS),
     "gpt2: Muon vs AdamW step time (bf16, compiled); a short Muon + WSD run learns"),
]


# -------------------------------------------------------------------------------------------- probes
def probe_env() -> None:
    """One JSON line: what this machine is and which backends import (run in a subprocess by step_env)."""
    import importlib.metadata
    import importlib.util
    import platform

    info: dict[str, Any] = {"python": platform.python_version(), "dry_run": DRY_RUN}
    import torch

    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                cpu_threads=torch.get_num_threads())
    for mod in ("transformers", "accelerate", "tiktoken", "tensorboard", "torchao", "transformer_engine"):
        try:
            info[mod] = importlib.metadata.version(mod.replace("_", "-") if mod == "transformer_engine" else mod)
        except importlib.metadata.PackageNotFoundError:
            info[mod] = None
    info["datasets_importable"] = importlib.util.find_spec("datasets") is not None
    from hf_gpt2_train.mfu import peak_row
    from hf_gpt2_train.precision import torchao_float8_available, transformer_engine_available

    info["fp8_backends"] = {"torchao": torchao_float8_available(), "transformer_engine": transformer_engine_available()}
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        free, total = torch.cuda.mem_get_info()
        info.update(device=name, capability=".".join(map(str, torch.cuda.get_device_capability())),
                    memory_gb=round(total / 2**30, 1), peak_tflops_bf16_fp8_tf32=peak_row(name))
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info["device"] = platform.processor() or "cpu"
    try:
        from hf_gpt2_train.data.tokenizer import get_encoding

        get_encoding("")
        info["gpt2_vocabulary_offline"] = True
    except Exception as e:  # noqa: BLE001  recorded, not fatal: the training steps will say more
        info["gpt2_vocabulary_offline"] = f"{type(e).__name__}: {e}"
    info["pinned_batches"] = _probe_pinned() if torch.cuda.is_available() else "not applicable (no CUDA)"
    print(json.dumps(info))


def _probe_pinned() -> Any:
    """The training loader's batches are page-locked on CUDA and equal the pageable ones."""
    from hf_gpt2_train.config import DataConfig
    from hf_gpt2_train.data.loader import TrainLoader, resolve_data_dir

    try:
        data = resolve_data_dir(DataConfig())
        pinned, plain = (TrainLoader(data, 64, 4, 0, 1, 0, True, pin_memory=p) for p in (True, False))
        (x, y), (x0, y0) = pinned.next_batch(), plain.next_batch()
        return bool(x.is_pinned() and y.is_pinned() and x.equal(x0) and y.equal(y0))
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


def probe_corpus(path: str, max_chars: int) -> None:
    """Write this Python's standard library sources (sorted, site-packages excluded) as .jsonl, up to max_chars."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts))
    total = 0
    with open(path, "w") as f:
        for p in files:
            try:
                text = p.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            f.write(json.dumps({"text": text}) + "\n")
            total += len(text)
            if total >= max_chars:
                break
    print(json.dumps({"files": len(files), "chars": total}))


def probe_export(path: str) -> None:
    """One JSON line: the export loads as a stock transformers model and predicts real text far from uniform."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_gpt2_train.data.embedded import embedded_documents
    from hf_gpt2_train.data.tokenizer import get_encoding

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = get_encoding("").encode_ordinary(embedded_documents()[0])[: model.config.n_positions]
    x = torch.tensor([ids])
    with torch.no_grad():
        loss = model(input_ids=x, labels=x).loss.item()
    print(json.dumps({"class": type(model).__name__, "vocab_size": model.config.vocab_size,
                      "n_layer": model.config.n_layer, "loss_on_text": loss,
                      "params": sum(p.numel() for p in model.parameters())}))


# -------------------------------------------------------------------------------------------- driver
def main(out_dir: str) -> int:
    global _BLOCKER_DIR
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S", "600" if DRY_RUN else "480"))
    work = Path(os.environ.get("GPU_CHECK_WORK_DIR") or tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    _BLOCKER_DIR = _make_blocker(work)
    t_start = time.monotonic()
    doc: dict[str, Any] = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                           "dry_run": DRY_RUN, "budget_s": budget, "work_dir": str(work),
                           "command": shlex.join(sys.argv), "steps": []}
    with open(out / "gpu_check.log", "w") as log:
        ctx = Context(out=out, work=work, log=log)
        only = {s.strip() for s in os.environ.get("GPU_CHECK_STEPS", "").split(",") if s.strip()}
        for name, cap, fn, what in STEPS:
            if only and name not in only:  # GPU_CHECK_STEPS=env,memory_modes: a rerun of some steps
                continue
            left = budget - (time.monotonic() - t_start)
            rec: dict[str, Any] = {"name": name, "what": what, "cap_s": cap * CAP_SCALE}
            t0 = time.monotonic()
            no_gpu = not DRY_RUN and ctx.env_info and not ctx.env_info.get("cuda_available")
            if left < MIN_STEP_S or no_gpu:
                why = ("no CUDA device here: run GPU_CHECK_DRY_RUN=1 on a CPU" if no_gpu
                       else f"out of time: {left:.0f} s of the budget left")
                rec.update(status="skipped", error=why, wall_s=0.0)
                doc["steps"].append(rec)
                continue
            cap = min(cap * CAP_SCALE, left)
            ctx.deadline, ctx.commands = t0 + cap, []
            log.write(f"\n===== {name} (cap {cap:.0f} s) =====\n")
            log.flush()
            try:
                result = fn(ctx)
                rec["result"] = result
                rec["status"] = "failed" if result.get("error") else "ok"
                if result.get("error"):
                    rec["error"] = result["error"]
            except TimeoutError as e:
                rec.update(status="timeout", error=str(e))
            except Exception as e:  # noqa: BLE001  a broken step is recorded; the next one runs
                rec.update(status="failed", error=f"{type(e).__name__}: {e}" if not isinstance(e, StepError) else str(e))
            rec["wall_s"] = round(time.monotonic() - t0, 1)
            rec["commands"] = ctx.commands
            doc["steps"].append(rec)
            log.write(f"===== {name}: {rec['status']} in {rec['wall_s']} s =====\n")
            log.flush()
            doc["wall_s"] = round(time.monotonic() - t_start, 1)
            (out / "gpu_check.json").write_text(json.dumps(doc, indent=2) + "\n")  # partial results survive a kill
    doc["wall_s"] = round(time.monotonic() - t_start, 1)
    doc["all_ok"] = all(s["status"] == "ok" for s in doc["steps"])
    (out / "gpu_check.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "gpu_check.md").write_text(summary(doc))
    print(summary(doc))
    return 0 if doc["all_ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--probe-env":
        probe_env()
    elif len(sys.argv) == 4 and sys.argv[1] == "--probe-corpus":
        probe_corpus(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) == 3 and sys.argv[1] == "--probe-export":
        probe_export(sys.argv[2])
    elif len(sys.argv) == 2 and not sys.argv[1].startswith("-"):
        sys.exit(main(sys.argv[1]))
    else:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        sys.exit(2)
