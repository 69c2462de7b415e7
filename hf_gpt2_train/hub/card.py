"""Model card (README.md) and loss-curve image for an export, filled from the run that produced it.

Everything comes from files the run wrote: the checkpoint's ``manifest.json`` (step, tokens, config),
its ``TrainerState`` (``custom_checkpoint_0.pkl``), and, when the checkpoint sits in an output dir
(``OUTPUT_DIR/checkpoints/<tier>/``), that run's ``run_info.json`` and ``metrics.jsonl``.
Nothing is invented: a value the run did not record is shown as "not recorded".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hf_gpt2_train.config import ConfigError
from hf_gpt2_train.redact import redact_secrets

CARD_TAG = "hf-gpt2-train"  # also how export.py recognises a folder it wrote

# Metric names: the tracker names (architecture.md) first, then the plain names of the issue-2 contract.
TRAIN_LOSS = ("train/loss", "loss")
VAL_LOSS = ("eval/val_loss", "val_loss")
HS_ACC_NORM = ("eval/hellaswag_acc_norm", "hellaswag_acc_norm")
HS_ACC = ("eval/hellaswag_acc", "hellaswag_acc")
HS_COUNT = ("eval/hellaswag_count", "hellaswag_count")
TOKENS = ("tokens", "train/tokens", "tokens_seen")


def _first(row: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        v = row.get(k)
        if v is not None:
            return v
    return None


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


@dataclass
class RunRecord:
    """What the card says about a checkpoint, gathered from the run's own files."""

    checkpoint: Path
    run_dir: Path | None
    step: int
    tokens_seen: int | None
    config: dict[str, Any]
    run_info: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    """metrics.jsonl rows, one per step (a resumed run's re-logged steps keep the latest line), by step."""
    val_loss: float | None = None
    val_loss_step: int | None = None
    hellaswag_acc_norm: float | None = None
    hellaswag_acc: float | None = None
    hellaswag_count: int | None = None
    wall_time_s: float | None = None

    @property
    def tier(self) -> str:
        return self.checkpoint.name


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as a step-sorted list; a step logged twice (crash, then resume) keeps its last line."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill -9 while the run was writing it
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            by_step.setdefault(row["step"], {}).update(row)
    return [by_step[s] for s in sorted(by_step)]


def _trainer_state(checkpoint: Path) -> dict[str, Any]:
    """TrainerState.state_dict() from the checkpoint (Accelerate saves registered objects with torch.save)."""
    p = checkpoint / "custom_checkpoint_0.pkl"
    if not p.is_file():
        return {}
    try:
        import torch

        d = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:  # an unreadable extra is not a reason to refuse the export
        return {}
    return d if isinstance(d, dict) else {}


def run_dir_of(checkpoint: Path) -> Path | None:
    """OUTPUT_DIR for OUTPUT_DIR/checkpoints/<tier>, else None."""
    for p in (checkpoint, checkpoint.resolve()):
        if p.parent.name == "checkpoints":
            return p.parent.parent
    return None


def collect_run_record(checkpoint: Path) -> RunRecord:
    """Gather step, tokens, config, precision, hardware and eval results for ``checkpoint``."""
    try:
        manifest = json.loads((checkpoint / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise ConfigError(f"{checkpoint}/manifest.json is missing or unreadable: pass a complete checkpoint "
                          "folder (see `hf-gpt2-train checkpoints list OUTPUT_DIR`)") from None
    state = _trainer_state(checkpoint)
    run_dir = run_dir_of(checkpoint)
    run_info: dict[str, Any] = {}
    metrics: list[dict[str, Any]] = []
    if run_dir is not None:
        if (run_dir / "run_info.json").is_file():
            try:
                run_info = json.loads((run_dir / "run_info.json").read_text())
            except json.JSONDecodeError:
                run_info = {}
        if (run_dir / "metrics.jsonl").is_file():
            metrics = read_metrics(run_dir / "metrics.jsonl")
    step = int(manifest.get("step", state.get("step", 0)))
    tokens = manifest.get("tokens_seen", state.get("tokens_seen"))
    rec = RunRecord(checkpoint=checkpoint, run_dir=run_dir, step=step,
                    tokens_seen=int(tokens) if tokens is not None else None,
                    config=redact_secrets(manifest.get("config") or run_info.get("config") or {}),
                    run_info=redact_secrets(run_info),  # runs saved before redaction existed may hold a token
                    metrics=metrics, wall_time_s=_finite(state.get("wall_time")))
    # Eval results as of this checkpoint: the latest eval logged at or before its step.
    for row in metrics:
        if row["step"] > step:
            break
        if (v := _finite(_first(row, VAL_LOSS))) is not None:
            rec.val_loss, rec.val_loss_step = v, row["step"]
        if (v := _finite(_first(row, HS_ACC_NORM))) is not None:
            rec.hellaswag_acc_norm = v
            rec.hellaswag_acc = _finite(_first(row, HS_ACC))
            c = _first(row, HS_COUNT)
            rec.hellaswag_count = int(c) if c is not None else None
    limit = (rec.config.get("eval") or {}).get("hellaswag_limit")
    if rec.hellaswag_acc_norm is not None and rec.hellaswag_count is None and limit:
        rec.hellaswag_count = int(limit)  # the evaluator scores the first hellaswag_limit examples
    if rec.val_loss is None:  # no metrics file next to the checkpoint: use what the checkpoint itself knows
        v = _finite(manifest.get("val_loss")) or _finite(state.get("last_val_loss"))
        if v is not None:
            rec.val_loss, rec.val_loss_step = v, step
    return rec


def plot_loss_curve(rec: RunRecord, path: Path) -> bool:
    """Train/val loss against step as a PNG (matplotlib Agg, no display needed). False if nothing to plot."""
    train = [(r["step"], v) for r in rec.metrics if (v := _finite(_first(r, TRAIN_LOSS))) is not None]
    val = [(r["step"], v) for r in rec.metrics if (v := _finite(_first(r, VAL_LOSS))) is not None]
    if not train and not val:
        return False
    # Figure + Agg canvas directly: no pyplot global state, safe inside a training process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue", linewidth=1.2)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss", color="tab:orange", markersize=4)
    ax.axvline(rec.step, color="gray", linestyle="--", linewidth=0.8, label=f"this checkpoint (step {rec.step})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(f"{rec.config.get('preset') or 'GPT-2'}: training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return True


def _fmt_int(n: int | None) -> str:
    return f"{n:,}" if n is not None else "not recorded"


def _fmt_hours(s: float | None) -> str:
    if s is None:
        return "not recorded"
    return f"{s / 3600:.2f} h" if s >= 360 else f"{s:.0f} s"


def _precision(info: dict[str, Any], cfg: dict[str, Any]) -> tuple[str, str]:
    requested = info.get("requested_precision") or (cfg.get("precision") or {}).get("mixed_precision")
    effective = info.get("effective_precision")
    eff = str(effective) if effective else "not recorded"
    if eff.startswith("fp8"):
        extras = [f"backend {info['fp8_backend']}"] if info.get("fp8_backend") else []
        if _finite(info.get("fp8_coverage")) is not None:
            extras.append(f"{100 * float(info['fp8_coverage']):.0f}% of matmul FLOPs in fp8")
        if info.get("bf16_layers"):
            extras.append(f"kept in higher precision: {', '.join(map(str, info['bf16_layers']))}")
        eff += f" ({'; '.join(extras)})" if extras else ""
    return (str(requested) if requested else "default of the launch config"), eff


def _dataset(cfg: dict[str, Any], info: dict[str, Any]) -> tuple[str, str | None]:
    """(human description, Hub dataset id or None) of the training data, from the shards' own manifest."""
    data_dir = info.get("data_dir") or (cfg.get("data") or {}).get("data_dir") or ""
    source: Any = None
    if data_dir:
        try:
            source = (json.loads((Path(data_dir) / "manifest.json").read_text()).get("settings") or {}).get("source")
        except (OSError, json.JSONDecodeError, AttributeError):
            source = None  # build-nanogpt / llm.c shards carry no manifest
    if isinstance(source, dict):
        kind = source.get("kind")
        if kind == "hf" and source.get("path"):
            sub = f" (`{source['config']}`)" if source.get("config") else ""
            return f"`{source['path']}`{sub}", str(source["path"])
        if kind == "embedded":
            return "the project's embedded quickstart corpus", None
        if kind == "files":
            return f"{len(source.get('files') or [])} local text file(s)", None
    if not (cfg.get("data") or {}).get("data_dir"):
        return "the project's embedded quickstart corpus", None
    return f"token shards from `{Path(data_dir).name}`", None


def render_model_card(rec: RunRecord, *, repo_ref: str, license: str, n_params: int, has_curve: bool,
                      title: str = "") -> str:
    """The README.md of an export: YAML front matter + what it is, how to load, recipe, results, license."""
    cfg, info = rec.config, rec.run_info
    m, o = cfg.get("model") or {}, cfg.get("optim") or {}
    preset = cfg.get("preset") or "custom"
    data_desc, dataset_id = _dataset(cfg, info)
    requested, effective = _precision(info, cfg)
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "license": license,
        "language": ["en"],
        "tags": ["gpt2", "text-generation", "causal-lm", "pretrained-from-scratch", CARD_TAG],
    }
    if dataset_id:
        meta["datasets"] = [dataset_id]
    front = yaml.safe_dump(meta, sort_keys=False).strip()
    name = title or (cfg.get("run") or {}).get("run_name") or "gpt2"

    def res(v: float | None, fmt: str) -> str:
        return format(v, fmt) if v is not None else "not measured"

    hs = res(rec.hellaswag_acc_norm, ".4f")
    if rec.hellaswag_acc_norm is not None and rec.hellaswag_count:
        hs += f" ({rec.hellaswag_count:,} examples)"
    versions = info.get("versions") or info.get("package_versions") or {}
    versions_txt = ", ".join(f"{k} {v}" for k, v in versions.items()) if isinstance(versions, dict) else ""
    device = info.get("device_name") or info.get("device") or "not recorded"
    world = info.get("world_size")
    batch = o.get("total_batch_size")
    lines = [
        "---", front, "---", "",
        f"# {name}", "",
        f"A GPT-2 language model ({m.get('n_layer')} layers, {m.get('n_head')} heads, hidden size "
        f"{m.get('n_embd')}, context {m.get('n_positions')} tokens, {n_params / 1e6:.1f}M parameters) pretrained "
        f"from scratch on {data_desc} with `hf-gpt2-train` (GPT-2 pretraining on HuggingFace Accelerate). "
        "The weights are a stock transformers `GPT2LMHeadModel`; the tokenizer is GPT-2's byte-level BPE "
        "(tiktoken `gpt2`, 50,257 tokens, `<|endoftext|>` as bos/eos).", "",
        "## How to use", "",
        "```python",
        "from transformers import pipeline",
        f'generator = pipeline("text-generation", model="{repo_ref}")',
        'print(generator("Hello, I\'m a language model,", max_new_tokens=30)[0]["generated_text"])',
        "```", "",
        "or, for the model and tokenizer themselves:", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_ref}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_ref}")',
        "```", "",
        "## Evaluation", "",
        "| metric | value |", "| --- | --- |",
        f"| validation loss (nats/token) | {res(rec.val_loss, '.4f')}"
        + (f" (at step {rec.val_loss_step:,})" if rec.val_loss_step is not None else "") + " |",
        f"| HellaSwag acc_norm (completion-style, 0-shot) | {hs} |",
        f"| HellaSwag acc | {res(rec.hellaswag_acc, '.4f')} |", "",
        "## Training", "",
        "| | |", "| --- | --- |",
        f"| preset | `{preset}` |",
        f"| checkpoint | `{rec.tier}` at optimizer step {rec.step:,} of {_fmt_int(o.get('max_steps'))} |",
        f"| tokens seen | {_fmt_int(rec.tokens_seen)} |",
        f"| batch | {_fmt_int(batch)} tokens per step, sequences of {o.get('seq_len')} tokens |",
        f"| optimizer | AdamW (betas {o.get('adam_beta1')}/{o.get('adam_beta2')}, weight decay "
        f"{o.get('weight_decay')}), peak lr {o.get('learning_rate')}, {o.get('warmup_steps')} warmup steps, "
        f"cosine decay to {o.get('min_lr_ratio')}x |",
        f"| precision requested | {requested} |",
        f"| precision in effect | {effective} |",
        f"| hardware | {device} |",
        f"| processes (world size) | {world if world is not None else 'not recorded'} |",
        f"| training time | {_fmt_hours(rec.wall_time_s)} |",
    ]
    if versions_txt:
        lines.append(f"| software | {versions_txt} |")
    lines.append("")
    if has_curve:
        lines += ["![Training and validation loss by optimizer step](loss_curve.png)", ""]
    lines += [
        "## Limitations", "",
        "A small model pretrained on web/book text with no instruction tuning or safety filtering: it continues "
        "text, often incorrectly, and can reproduce biases of its training data.", "",
        "## License", "",
        f"The model weights are released under the `{license}` license.", "",
    ]
    return "\n".join(lines)
