"""The update guard's baseline, measured: z-scores of clean runs and the junk-stretch target (issue 19).

Two parts, both through the real CLI (``python -m hf_gpt2_train``), fp32 on the CPU:

* ``clean``: clean runs of several presets and seeds with ``--logging_steps 1`` (each step's loss and grad norm
  land in metrics.jsonl): the quickstart (embedded corpus, its 120 steps), the quickstart model on tiny
  Shakespeare (200 steps, shuffled), and the gpt2 preset (124M) on tiny Shakespeare for 30 steps at 1,024 tokens
  per step. The guard runs with its defaults in each; the script reports the skipped updates and rollbacks the
  runs had, and replays the real ``UpdateGuard`` (this checkout's, defaults or ``--set k=v``) over the logged
  values to report the distribution of its z-scores: quantiles, maximum, margin to the thresholds, steps above
  ``spike_z_threshold``.
* ``junk``: the target of docs/resilience.md: the quickstart model on tiny Shakespeare read in order
  (``--shuffle false``), 200 steps of 1,024 tokens, with ~25 steps of random-token documents starting at each
  ``--positions`` step (tests/junk_corpus.py). Per position a run with the default defences and one with them
  off; one clean run (the same corpus with the junk at its end, never read). Reports val_loss @ 200 and its
  distance to the clean run, the skipped steps and rollbacks, and the z-scores of the first junk steps (the
  defences-off run logs every step).

Runs are cached in ``--dir`` (a run whose metrics.jsonl reached its last step is not run again). Usage:

    python benchmarks/guard_baseline.py clean --dir /tmp/gb [--seeds 1 2 3] [--output FILE.json]
    python benchmarks/guard_baseline.py junk --dir /tmp/gb [--positions 20 45 130] [--output FILE.json]

Counts only (no timing); on a shared machine pass ``--wrap /work/bin/cpu-shared`` (each run takes the shared lock
by itself, so quiet measurements of others can run between them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from hf_gpt2_train.config import ResilienceConfig, apply_overrides, build_config  # noqa: E402
from hf_gpt2_train.resilience.guard import INSTABILITY, UpdateGuard  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"  # --shared_data: tiny Shakespeare (tests read the same folder)
QUIET = ["--report_to", "none", "--hellaswag", "false", "--sample_max_new_tokens", "0"]
JUNK_STEPS, JUNK_TOKENS_PER_STEP, JUNK_TOKENS = 200, 1024, 25_963


WRAP: list[str] = []
"""--wrap: a command each run goes through (e.g. /work/bin/cpu-shared on a shared machine)."""


def cli(*args: str, log: Path) -> int:
    with open(log, "w") as f:
        return subprocess.run([*WRAP, sys.executable, "-m", "hf_gpt2_train", *args], stdout=f,
                              stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)}).returncode


def rows(out: Path) -> list[dict[str, Any]]:
    p = out / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def train(out: Path, steps: int, *args: str) -> Path:
    """One training run into ``out`` (skipped when a previous one reached ``steps``)."""
    if any(r.get("step") == steps and "eval/val_loss" in r for r in rows(out)):
        return out
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    cmd = ["train", *args, "--max_steps", str(steps), "--output_dir", str(out)]
    (out.parent / f"{out.name}.cmd").write_text(" ".join(["hf-gpt2-train", *cmd]) + "\n")
    print("+ hf-gpt2-train", " ".join(cmd), flush=True)
    code = cli(*cmd, log=out.parent / f"{out.name}.log")
    if code != 0:
        raise SystemExit(f"run {out} failed with exit code {code}: see {out.parent / (out.name + '.log')}")
    return out


def prepare(source: Path, out: Path) -> Path:
    if not (out / "manifest.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        code = cli("prepare-data", "--source", str(source), "--output_dir", str(out), "--val_tokens", "20000",
                   "--num_proc", "1", "--no_progress", log=out.parent / f"{out.name}.prepare.log")
        if code != 0:
            raise SystemExit(f"prepare-data {source} failed ({code})")
    return out


def per_step(out: Path) -> tuple[list[int], list[float], list[float]]:
    """Steps, losses and grad norms as logged (the history the run kept, after any rollback)."""
    by_step = {r["step"]: r for r in rows(out) if "train/loss" in r}
    steps = sorted(by_step)
    return steps, [by_step[s]["train/loss"] for s in steps], [by_step[s]["train/grad_norm"] for s in steps]


def replay(losses: list[float], grad_norms: list[float], cfg: ResilienceConfig) -> dict[str, list[float]]:
    """Feed the logged values to a fresh UpdateGuard; its z-scores, flags and skip decisions per step."""
    g = UpdateGuard(cfg, "skip", torch.device("cpu"), capacity=len(losses))
    skips = [float(g.check(torch.tensor(a), torch.tensor(b), i + 1, (i, i + 1)))
             for i, (a, b) in enumerate(zip(losses, grad_norms, strict=True))]
    recs = g.collect().records
    return {"loss_z": [r.loss_z for r in recs], "grad_norm_z": [r.grad_norm_z for r in recs],
            "spiking": [float(r.spiking) for r in recs], "skip": skips,
            "instability": [float(bool(r.flags & INSTABILITY)) for r in recs],
            "grad_norm_ratio": [r.grad_norm_ratio for r in recs]}


JUNK_PROBE = 11.0
"""The loss of a model that has trained on tiny Shakespeare for 20-130 steps on a step of random-token documents:
10.85-12.0 in the defences-off runs of the junk part (their first full junk steps)."""


def probe_junk(losses: list[float], grad_norms: list[float], cfg: ResilienceConfig, steps: range) -> dict[str, Any]:
    """The guard's loss z-score of a junk step (``JUNK_PROBE``, grad norm at its level) arriving at each of
    ``steps`` after the logged clean steps before it: the smallest, and at which step."""
    out = []
    for at in steps:
        g = UpdateGuard(cfg, "skip", torch.device("cpu"), capacity=at)
        for i in range(at - 1):
            g.check(torch.tensor(losses[i]), torch.tensor(grad_norms[i]), i + 1, (i, i + 1))
        out.append((float(g.z_scores(torch.tensor([JUNK_PROBE, grad_norms[at - 2]]))[0][0]), at))
    z, at = min(out)
    return {"min_z": round(z, 2), "at_step": at}


def plain_window(values: list[float], n: int, threshold: float, probe: float | None = None) -> dict[str, Any]:
    """What the guard before issue 19 would have judged with an ``n``-step window: z = (x - mean) / std of the last
    ``n`` accepted values (a value above ``threshold`` stays out), from the step after the window is full; with
    ``probe``, also the smallest z-score a probe value would have had at steps 17-64."""
    window: list[float] = []
    zs, probes = [], []
    for x in values:
        z = float("nan")
        if len(window) >= n:
            t = torch.tensor(window[-n:])
            mean, std = t.mean(), torch.maximum(t.std(), 1e-3 * t.mean().abs() + 1e-12)
            z = float((x - mean) / std)
            if probe is not None and 17 <= len(zs) + 1 <= 64:
                probes.append(float((probe - mean) / std))
        zs.append(z)
        if not z > threshold:
            window.append(x)
    out = {"max_z": quantiles(zs).get("max"), "above_threshold": sum(z > threshold for z in zs)}
    if probe is not None:
        out["junk_probe_min_z"] = round(min(probes), 2) if probes else None
    return out


def quantiles(xs: list[float]) -> dict[str, float]:
    t = torch.tensor([x for x in xs if x == x], dtype=torch.float64)  # NaN: the guard was not judging yet
    if not len(t):
        return {"n": 0}
    q = torch.quantile(t, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    return {"n": len(t), "median": round(q[0], 3), "p90": round(q[1], 3), "p99": round(q[2], 3),
            "max": round(float(t.max()), 3)}


def longest(flags: list[float]) -> int:
    best = cur = 0
    for f in flags:
        cur = cur + 1 if f else 0
        best = max(best, cur)
    return best


def in_run(out: Path) -> dict[str, Any]:
    """What the guard did in the run itself: skipped updates and rollbacks (train.log and metrics)."""
    log = (out / "train.log").read_text() if (out / "train.log").exists() else ""
    return {"skipped_updates": sum(int(r.get("train/skipped_updates", 0)) for r in rows(out) if "train/loss" in r),
            "skip_lines": sum("update guard: skipped" in x for x in log.splitlines()),
            "rollbacks": len(re.findall(r"rollback \d+/\d+ at step", log))}


def analyse(out: Path, cfg: ResilienceConfig) -> dict[str, Any]:
    _, losses, gns = per_step(out)
    z = replay(losses, gns, cfg)
    calm = [v for v, i in zip(z["loss_z"], z["instability"], strict=True) if not i]
    ratios = [r for r in z["grad_norm_ratio"] if r == r]
    return {"steps": len(losses), **in_run(out), "replay_skipped": int(sum(z["skip"])),
            "replay_spiking_steps": int(sum(z["spiking"])), "longest_spiking_stretch": longest(z["spiking"]),
            "first_judged_step": next((i + 1 for i, v in enumerate(z["loss_z"]) if v == v), None),
            "instabilities": [{"step": i + 1, "loss": round(losses[i], 3), "loss_z": round(z["loss_z"][i], 1),
                               "grad_norm_ratio": round(z["grad_norm_ratio"][i], 1)}
                              for i, f in enumerate(z["instability"]) if f],
            "loss_z": quantiles(z["loss_z"]), "loss_z_without_instabilities": quantiles(calm),
            "grad_norm_z": quantiles(z["grad_norm_z"]), "grad_norm_ratio": quantiles(ratios),
            "junk_probe": probe_junk(losses, gns, cfg, range(17, min(65, len(losses)))) if len(losses) > 64 else None,
            **{f"plain_window_{n}": {"loss": plain_window(losses, n, cfg.loss_z_threshold, JUNK_PROBE),
                                     "grad_norm": plain_window(gns, n, cfg.grad_norm_z_threshold)} for n in (16, 32)}}


# ------------------------------------------------------------------------------------------------- clean
def clean_runs(root: Path, seeds: list[int], shared: Path) -> dict[str, Path]:
    ts = prepare(shared / "tinyshakespeare.txt", root / "data" / "tinyshakespeare")
    out = {}
    for s in seeds:
        common = [*QUIET, "--logging_steps", "1", "--checkpoint_steps", "0", "--seed", str(s)]
        out[f"quickstart/seed{s}"] = train(root / "clean" / f"quickstart-s{s}", 120, "--preset", "quickstart",
                                           *common)
        out[f"tinyshakespeare/seed{s}"] = train(root / "clean" / f"tinyshakespeare-s{s}", 200, "--preset",
                                                "quickstart", "--data_dir", str(ts), *common)
        out[f"gpt2-30/seed{s}"] = train(root / "clean" / f"gpt2-s{s}", 30, "--preset", "gpt2", "--data_dir", str(ts),
                                        "--total_batch_size", "1024", "--per_device_train_batch_size", "1",
                                        "--val_batches", "1", *common)
    return out


# -------------------------------------------------------------------------------------------------- junk
def junk_runs(root: Path, positions: list[int], shared: Path) -> dict[str, Any]:
    from tests.junk_corpus import write_corpus

    recipe = ["--preset", "quickstart", "--shuffle", "false", *QUIET]
    off = ["--skip_outlier_updates", "false", "--rollback_after", "0", "--logging_steps", "1"]
    d = root / "junk"
    clean_data = prepare(write_corpus(d / "corpus-clean" / "docs.jsonl", shared, None, JUNK_TOKENS_PER_STEP,
                                      JUNK_TOKENS, junk_at_end=True), d / "data-clean")
    # Every step logged (for the z-scores); on clean data the defences do nothing, so the run is the same.
    clean = train(d / "clean", JUNK_STEPS, *recipe, "--data_dir", str(clean_data), "--logging_steps", "1")
    result: dict[str, Any] = {"clean": {"val_loss": val_loss(clean), **analyse(clean, ResilienceConfig())}}
    for p in positions:
        data = prepare(write_corpus(d / f"corpus-{p}" / "docs.jsonl", shared, p, JUNK_TOKENS_PER_STEP,
                                    JUNK_TOKENS), d / f"data-{p}")
        defended = train(d / f"defended-{p}", JUNK_STEPS, *recipe, "--data_dir", str(data))
        undefended = train(d / f"off-{p}", JUNK_STEPS, *recipe, "--data_dir", str(data), *off)
        steps, losses, gns = per_step(undefended)
        z = replay(losses, gns, ResilienceConfig())
        first = p - 1  # index of step p
        log = (defended / "train.log").read_text()
        result[str(p)] = {
            "defaults": {"val_loss": val_loss(defended), "vs_clean": round(val_loss(defended) - val_loss(clean), 4),
                         **in_run(defended), "rollback_lines": [x.split(" WARNING ", 1)[-1] for x in log.splitlines()
                                                                if "rollback 1/" in x or "no checkpoint" in x]},
            "defences_off": {"val_loss": val_loss(undefended),
                             "vs_clean": round(val_loss(undefended) - val_loss(clean), 4)},
            "junk_steps_z (defences off, first 5)": {
                "loss_z": [round(v, 1) for v in z["loss_z"][first:first + 5]],
                "grad_norm_z": [round(v, 1) for v in z["grad_norm_z"][first:first + 5]],
                "loss": [round(v, 3) for v in losses[first:first + 5]],
                "loss_before": [round(v, 3) for v in losses[first - 3:first]]},
        }
    return result


def val_loss(out: Path) -> float:
    return [r for r in rows(out) if "eval/val_loss" in r][-1]["eval/val_loss"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=["clean", "junk"])
    ap.add_argument("--dir", required=True, help="workspace: prepared data and the runs (cached)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--positions", type=int, nargs="+", default=[20, 45, 130])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="replay the guard with these resilience settings instead of the defaults")
    ap.add_argument("--shared_data", default=str(SHARED_DATA), help="folder holding tinyshakespeare.txt")
    ap.add_argument("--wrap", default="", help="prefix every run with this command (e.g. /work/bin/cpu-shared)")
    ap.add_argument("--output", help="write the results as JSON here")
    a = ap.parse_args(argv)
    WRAP[:] = a.wrap.split()
    root = Path(a.dir)
    root.mkdir(parents=True, exist_ok=True)
    cfg = ResilienceConfig()
    if a.set:
        full = build_config("quickstart")
        apply_overrides(full, dict(kv.split("=", 1) for kv in a.set), source="--set")
        cfg = full.resilience
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
        "device": "cpu", "torch": torch.__version__, "command": " ".join(["python", *sys.argv]),
        "guard": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}
    if a.part == "clean":
        result["runs"] = {name: analyse(out, cfg) for name, out in clean_runs(root, a.seeds, Path(a.shared_data)).items()}
    else:
        result["junk"] = junk_runs(root, a.positions, Path(a.shared_data))
    text = json.dumps(result, indent=1)
    print(text)
    if a.output:
        Path(a.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
