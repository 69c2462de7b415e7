"""Tokens to quality: Muon + warmup-stable-decay against AdamW + cosine on the same model, data and batches.

A small GPT-2 (default 4 layers, n_embd 128) trains on tiny Shakespeare, prepared by ``hf-gpt2-train
prepare-data``, through the real CLI (``hf-gpt2-train train``), every run with the same tokens per step:

1. lr sweep, seed 0: AdamW + cosine over ``--adamw_lrs``; then Muon + WSD over ``--muon_lrs`` (the AdamW part of
   Muon runs, embeddings/biases/LayerNorms, uses the best AdamW lr). A sweep whose best value is at an edge of its
   grid is extended by one value beyond that edge (up to twice), so the kept lr is a real optimum.
2. The best lr of each runs with every seed (``--seeds``).
3. Tokens to the target: the target of a seed is its AdamW + cosine run's final validation loss. A WSD run can be
   cooled down from any checkpoint of its stable phase, which is what makes "how many tokens does Muon need"
   measurable without a run per length: each seed's Muon run saves a milestone every ``--branch_every`` steps, and
   ``--decay_now`` branches from them end at ``M = step / (1 - decay_fraction)``. Their final validation losses
   (plus the full run's) give Muon's loss as a function of the run length; the first length whose loss reaches the
   target (linearly interpolated between branch ends) over AdamW's length is the seed's token ratio.
4. ``--ablation_seeds``: AdamW + WSD at the best AdamW lr with the same branches, to tell the schedule's share from the
   optimizer's.

The JSON (``--output``) holds the settings, every run's final validation loss and per-step training loss, the
branches, the ratios per seed with their spread, and the command; a PNG of the curves goes next to it. Runs
already finished in ``--work`` are reused, so an interrupted measurement continues where it stopped.

Usage: ``python benchmarks/token_efficiency.py --output docs/bench/token_efficiency.json [--work DIR]`` (run it
under a CPU share: it counts tokens, not time).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hf_gpt2_train", *args]


PREFIX: list[str] = []  # --run_prefix: e.g. a CPU-share wrapper around each run


def run(argv: list[str], log: Path) -> None:
    argv = [*PREFIX, *argv]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    with open(log, "w") as f:
        proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {shlex.join(argv)}\n" + log.read_text()[-3000:])


def read_metrics(out: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(step -> train loss, step -> val loss) of a run folder."""
    train, val = {}, {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "train/loss" in r:
            train[r["step"]] = r["train/loss"]
        if "eval/val_loss" in r:
            val[r["step"]] = r["eval/val_loss"]
    return train, val


class Measurement:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.work)
        self.data = self.work / "data"
        self.runs: dict[str, dict[str, Any]] = {}
        self.seconds = 0.0

    def common(self) -> list[str]:
        a = self.args
        return ["--data_dir", str(self.data), "--n_layer", str(a.n_layer), "--n_head", str(a.n_head),
                "--n_embd", str(a.n_embd), "--n_positions", str(a.seq_len), "--seq_len", str(a.seq_len),
                "--per_device_train_batch_size", str(a.micro_batch), "--total_batch_size", str(a.tokens_per_step),
                "--max_steps", str(a.steps), "--warmup_steps", str(a.warmup_steps), "--val_batches",
                str(a.val_batches), "--eval_steps", "0", "--logging_steps", "1", "--report_to", "none",
                "--hellaswag", "false", "--sample_max_new_tokens", "0", "--compile", "false"]

    def prepare(self) -> None:
        if not (self.data / "manifest.json").is_file():
            self.work.mkdir(parents=True, exist_ok=True)
            run(cli("prepare-data", "--source", self.args.source, "--output_dir", str(self.data), "--val_tokens",
                    str(self.args.val_tokens), "--no_progress"), self.work / "prepare.log")
        self.tokens = json.loads((self.data / "manifest.json").read_text())["tokens"]

    def train(self, name: str, extra: list[str], resume: Path | None = None) -> dict[str, Any]:
        """One run (reused when its final checkpoint exists); its final val loss and training curve."""
        out = self.work / "runs" / name
        if not (out / "checkpoints" / "final" / "manifest.json").is_file():
            if out.exists():
                import shutil

                shutil.rmtree(out)  # an interrupted run: start it again
            argv = cli("train", *self.common(), *extra, "--output_dir", str(out))
            if resume is not None:
                argv += ["--resume_from_checkpoint", str(resume), "--decay_now", "true"]
            out.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.monotonic()
            run(argv, self.work / "runs" / f"{name}.log")
            self.seconds += time.monotonic() - t0
        train, val = read_metrics(out)
        final = max(val)
        rec = {"name": name, "args": extra, "steps": final, "tokens": final * self.args.tokens_per_step,
               "val_loss": val[final], "train_loss": [train[s] for s in sorted(train)],
               "first_step": min(train)}
        self.runs[name] = rec
        return rec

    # ------------------------------------------------------------------------------------------ the sweep
    def sweep(self, kind: str, grid: list[float], lr_run) -> float:
        """Seed-0 runs over ``grid`` (extended past an edge that wins, at most twice); the best lr."""
        grid = sorted(grid)
        for _ in range(3):
            losses = {lr: lr_run(lr, 0)["val_loss"] for lr in grid}
            best = min(losses, key=losses.get)
            ratio = grid[1] / grid[0]
            if best == grid[0]:
                grid.insert(0, grid[0] / ratio)
            elif best == grid[-1]:
                grid.append(grid[-1] * ratio)
            else:
                break
        self.grids[kind] = {f"{lr:g}": v for lr, v in losses.items()}
        return best

    def wsd_run(self, kind: str, lr_args: list[str], lr: float, seed: int) -> dict[str, Any]:
        """A full WSD run, saving a milestone every ``branch_every`` steps (the cooldown branches start there)."""
        return self.train(f"{kind}_lr{lr:g}_seed{seed}", [*lr_args, "--seed", str(seed), "--milestone_steps",
                                                          str(self.args.branch_every)])

    def branches(self, kind: str, lr_args: list[str], lr: float, seed: int) -> list[dict[str, Any]]:
        """``--decay_now`` cooldowns from the milestones of a WSD run: (run length, final val loss) points."""
        a = self.args
        full = self.wsd_run(kind, lr_args, lr, seed)
        stable_end = a.steps - round(a.decay_fraction * a.steps)
        points = [{"branch_from": None, "steps": full["steps"], "tokens": full["tokens"],
                   "val_loss": full["val_loss"]}]
        for s in range(a.branch_every * 2, stable_end, a.branch_every):
            ckpt = self.work / "runs" / full["name"] / "checkpoints" / f"milestone_{s:07d}"
            b = self.train(f"{full['name']}_cooldown_from{s}", [*lr_args, "--seed", str(seed)], resume=ckpt)
            points.append({"branch_from": s, "steps": b["steps"], "tokens": b["tokens"], "val_loss": b["val_loss"]})
        return sorted(points, key=lambda p: p["tokens"])

    def measure(self) -> dict[str, Any]:
        a = self.args
        self.grids: dict[str, dict[str, float]] = {}
        self.prepare()
        cosine = ["--optimizer", "adamw", "--lr_schedule", "cosine"]
        wsd = ["--lr_schedule", "wsd", "--decay_fraction", f"{a.decay_fraction:g}"]

        def adamw_run(lr: float, seed: int) -> dict[str, Any]:
            return self.train(f"adamw_cosine_lr{lr:g}_seed{seed}",
                              [*cosine, "--learning_rate", f"{lr:g}", "--seed", str(seed)])

        best_adamw = self.sweep("adamw_cosine", a.adamw_lrs, adamw_run)
        muon = ["--optimizer", "muon", "--learning_rate", f"{best_adamw:g}", *wsd]

        def muon_args(lr: float) -> list[str]:
            return [*muon, "--muon_learning_rate", f"{lr:g}"]

        # The AdamW lr of Muon's embeddings/biases/LayerNorms is in the run name: a cached run made with another
        # AdamW winner is not reused.
        kind = f"muon_wsd_adamw{best_adamw:g}"
        best_muon = self.sweep("muon_wsd", a.muon_lrs, lambda lr, seed: self.wsd_run(kind, muon_args(lr), lr, seed))
        seeds: list[dict[str, Any]] = []
        for seed in range(a.seeds):
            target = adamw_run(best_adamw, seed)
            points = self.branches(kind, muon_args(best_muon), best_muon, seed)
            row = {"seed": seed, "target_val_loss": target["val_loss"], "adamw_tokens": target["tokens"],
                   "muon_points": points, **tokens_to(points, target["val_loss"], target["tokens"])}
            if seed < a.ablation_seeds:
                ab_args = ["--optimizer", "adamw", "--learning_rate", f"{best_adamw:g}", *wsd]
                row["adamw_wsd_points"] = ab = self.branches("adamw_wsd", ab_args, best_adamw, seed)
                row["adamw_wsd"] = tokens_to(ab, target["val_loss"], target["tokens"])
            seeds.append(row)
        ratios = [s["ratio"] for s in seeds if s["ratio"] is not None]
        return {
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device": f"{cpu_model()}, {os.cpu_count()} cores (shared)", "command": shlex.join([sys.executable, *sys.argv]),
            "git_commit": _git("rev-parse", "HEAD"), "torch": _torch_version(),
            "data": {"source": "tiny Shakespeare (prepare-data)", "tokens": self.tokens},
            "model": {"n_layer": a.n_layer, "n_head": a.n_head, "n_embd": a.n_embd, "seq_len": a.seq_len},
            "tokens_per_step": a.tokens_per_step, "steps": a.steps, "warmup_steps": a.warmup_steps,
            "decay_fraction": a.decay_fraction, "val_tokens_scored": a.val_batches * a.micro_batch * a.seq_len,
            "lr_grids": self.grids, "best": {"adamw_learning_rate": best_adamw, "muon_learning_rate": best_muon},
            "seeds": seeds,
            "ratio": {"per_seed": [s["ratio"] for s in seeds],
                      "mean": statistics.mean(ratios) if ratios else None,
                      "min": min(ratios) if ratios else None, "max": max(ratios) if ratios else None,
                      "stdev": statistics.stdev(ratios) if len(ratios) > 1 else None,
                      "all_reached": len(ratios) == len(seeds)},
            "runs": self.runs, "train_seconds": round(self.seconds),
        }


def tokens_to(points: list[dict[str, Any]], target: float, reference_tokens: int) -> dict[str, Any]:
    """The tokens at which a loss-vs-length curve (points sorted by tokens) first reaches ``target``, linearly
    interpolated between the two lengths around it, and that over ``reference_tokens``. None: never reached;
    ``at_most``: the shortest length already reaches it (the ratio is an upper bound)."""
    for i, p in enumerate(points):
        if p["val_loss"] <= target:
            if i == 0:
                return {"tokens_to_target": p["tokens"], "ratio": p["tokens"] / reference_tokens, "at_most": True}
            q = points[i - 1]
            t = q["tokens"] + (q["val_loss"] - target) / (q["val_loss"] - p["val_loss"]) * (p["tokens"] - q["tokens"])
            return {"tokens_to_target": round(t), "ratio": t / reference_tokens, "at_most": False}
    return {"tokens_to_target": None, "ratio": None, "at_most": False,
            "best_val_loss": min(p["val_loss"] for p in points)}


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    tps = doc["tokens_per_step"]
    best = doc["best"]
    for seed in doc["seeds"]:
        s = seed["seed"]
        for name, color, label in ((f"adamw_cosine_lr{best['adamw_learning_rate']:g}_seed{s}", "tab:blue",
                                    "AdamW + cosine"), (f"muon_wsd_adamw{best['adamw_learning_rate']:g}_lr{best['muon_learning_rate']:g}_seed{s}",
                                                        "tab:red", "Muon + WSD")):
            r = doc["runs"][name]
            losses = r["train_loss"]
            ema, smooth = losses[0], []
            for x in losses:
                ema = 0.9 * ema + 0.1 * x
                smooth.append(ema)
            xs = [(r["first_step"] + i) * tps for i in range(len(smooth))]
            ax1.plot(xs, smooth, color=color, lw=1, alpha=0.8, label=label if s == 0 else None)
        pts = seed["muon_points"]
        ax2.plot([p["tokens"] for p in pts], [p["val_loss"] for p in pts], "o-", color="tab:red", alpha=0.7,
                 label="Muon + WSD, run ending there" if s == 0 else None)
        if "adamw_wsd_points" in seed:
            pts = seed["adamw_wsd_points"]
            ax2.plot([p["tokens"] for p in pts], [p["val_loss"] for p in pts], "s--", color="tab:green", alpha=0.6,
                     label="AdamW + WSD, run ending there" if s == 0 else None)
        ax2.plot([seed["adamw_tokens"]], [seed["target_val_loss"]], "*", color="tab:blue", ms=12,
                 label="AdamW + cosine (target)" if s == 0 else None)
        ax2.axhline(seed["target_val_loss"], color="tab:blue", lw=0.5, ls=":")
    ax1.set(xlabel="training tokens", ylabel="train loss (EMA 0.9)", title="Training loss, best lr, every seed")
    ax2.set(xlabel="training tokens (run length)", ylabel="final validation loss",
            title="Validation loss at the end of runs of each length")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    from hf_gpt2_train.tracking import cpu_model as model_name

    return model_name()


def _torch_version() -> str:
    import torch

    return torch.__version__


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--output", default=str(REPO / "docs" / "bench" / "token_efficiency.json"))
    p.add_argument("--source", default=str(SHAKESPEARE), help="tiny Shakespeare (../shared/data beside the checkout)")
    p.add_argument("--work", default="/tmp/hf-gpt2-token-efficiency", help="runs and data (reused when present)")
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--micro_batch", type=int, default=8)
    p.add_argument("--tokens_per_step", type=int, default=1024)
    p.add_argument("--steps", type=int, default=128, help="length of the AdamW + cosine runs and the full WSD runs")
    p.add_argument("--warmup_steps", type=int, default=12)
    p.add_argument("--decay_fraction", type=float, default=0.2)
    p.add_argument("--val_tokens", type=int, default=32768, help="validation split prepare-data keeps")
    p.add_argument("--val_batches", type=int, default=16, help="validation micro-batches scored at the end of a run")
    p.add_argument("--adamw_lrs", type=floats, default=[2e-3, 4e-3, 8e-3])
    p.add_argument("--muon_lrs", type=floats, default=[0.02, 0.04, 0.08])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--branch_every", type=int, default=16, help="milestone spacing of the WSD runs (cooldown branches)")
    p.add_argument("--ablation_seeds", type=int, default=1, help="seeds that also run AdamW + WSD with the same "
                   "branches (the schedule's share of the difference)")
    p.add_argument("--run_prefix", default="", help="command put before every run (e.g. a CPU-share wrapper such as "
                   "/work/bin/cpu-shared on a shared machine, so that others' measurements fit between the runs)")
    args = p.parse_args()
    PREFIX[:] = shlex.split(args.run_prefix)
    m = Measurement(args)
    doc = m.measure()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, out.with_suffix(".png"))
    r = doc["ratio"]
    print(f"wrote {out} and {out.with_suffix('.png')}")
    print(f"best lr: AdamW {doc['best']['adamw_learning_rate']:g}, Muon {doc['best']['muon_learning_rate']:g}")
    for s in doc["seeds"]:
        print(f"seed {s['seed']}: AdamW+cosine val {s['target_val_loss']:.4f} at {s['adamw_tokens']:,} tokens; "
              f"Muon+WSD reaches it at {s['tokens_to_target']} tokens (ratio {s['ratio']})")
    print(f"ratio mean {r['mean']}, min {r['min']}, max {r['max']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
