"""The model card's loss curve: smoothed train loss over the raw values, val loss, resumes, this checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

from hf_gpt2_train.hub.card import TRAIN_LOSS, VAL_LOSS, RunRecord, _finite, _first


def ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so the first points are not pulled to 0."""
    out, acc = [], 0.0
    for i, v in enumerate(values, start=1):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight**i))
    return out


def smooth(values: list[float]) -> list[float]:
    """EMA forwards then backwards over the run (no lag: a one-way EMA trails a fast-falling loss by its window),
    with a window of about 2% of the points (none for a dozen points: a short run has nothing to smooth)."""
    window = len(values) / 50
    if window <= 1:
        return list(values)
    weight = 1.0 - 1.0 / window
    return ema(ema(values, weight)[::-1], weight)[::-1]


def resume_steps(rows: list[dict]) -> list[int]:
    """Steps a run was resumed from: the tracker's ``{"event": "resume"}`` lines of metrics.jsonl."""
    return sorted({r["step"] for r in rows if r.get("event") == "resume"})


def y_limits(smoothed: list[float], val: list[float], raw: list[float]) -> tuple[float, float, bool]:
    """(bottom, top, clipped): the top leaves out the first 10% of the run's steps (loss ~ln(vocab) at init falls
    fast; plotting it would squeeze the rest of the curve into a flat line)."""
    body = smoothed[len(smoothed) // 10:] if len(smoothed) >= 10 else smoothed
    shown = [v for v in body + val if math.isfinite(v)] or [0.0, 1.0]
    lo = min([*shown, *(v for v in raw[len(raw) // 10:] if math.isfinite(v))] or shown)
    hi = max(shown)
    pad = max(0.05, 0.08 * (hi - lo))
    top = hi + 2 * pad
    return lo - pad, top, any(v > top for v in raw)


def plot_loss_curve(rec: RunRecord, path: Path) -> bool:
    """Train/val loss against step as a PNG (matplotlib Agg, no display needed). False if nothing to plot.

    The train curve is EMA-smoothed (``smooth``) with the raw per-log values faint behind it; val loss is on the same axes;
    every resume of the run (``event: resume`` lines of metrics.jsonl) is a dotted vertical line.
    """
    train = [(r["step"], v) for r in rec.metrics if (v := _finite(_first(r, TRAIN_LOSS))) is not None]
    val = [(r["step"], v) for r in rec.metrics if (v := _finite(_first(r, VAL_LOSS))) is not None]
    resumes = resume_steps(rec.metrics)
    if not train and not val:
        return False
    # Figure + Agg canvas directly: no pyplot global state, safe inside a training process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps, raw = ([s for s, _ in train], [v for _, v in train]) if train else ([], [])
    smoothed = smooth(raw)
    if train and smoothed != raw:
        ax.plot(steps, raw, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss (raw, per log step)")
        ax.plot(steps, smoothed, color="tab:blue", linewidth=1.8, label="train loss (EMA-smoothed)")
    elif train:  # too few points to smooth
        ax.plot(steps, raw, color="tab:blue", linewidth=1.6, label="train loss (per log step)")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", color="tab:orange", markersize=4, linewidth=1.4,
                label="validation loss")
    for i, s in enumerate(resumes):
        ax.axvline(s, color="tab:green", linestyle=":", linewidth=1.2, label="resumed" if i == 0 else None)
    ax.axvline(rec.step, color="gray", linestyle="--", linewidth=0.8, label=f"this checkpoint (step {rec.step:,})")
    bottom, top, clipped = y_limits(smoothed, [v for _, v in val], raw)
    ax.set_ylim(bottom, top)
    ax.set_xlim(left=0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats/token)" + ("\n(first steps above the top, clipped)" if clipped else ""))
    ax.set_title(f"{rec.config.get('preset') or 'GPT-2'}: train loss (smoothed) and validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return True
