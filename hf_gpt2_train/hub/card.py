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


def _fmt_int(n: int | None) -> str:
    return f"{n:,}" if n is not None else "not recorded"


def _fmt_hours(s: float | None) -> str:
    if s is None:
        return "not recorded"
    return f"{s / 3600:.2f} h" if s >= 360 else f"{s:.0f} s"


def _precision(info: dict[str, Any], cfg: dict[str, Any]) -> tuple[str, str]:
    """(requested, in effect), named by what runs: fp32 / fp16 / bf16 / fp8 (te|ao, coverage N%)."""
    from hf_gpt2_train.precision import precision_id, precision_name

    requested = info.get("requested_precision") or (cfg.get("precision") or {}).get("mixed_precision")
    effective = info.get("effective_precision")
    if not effective:
        eff = "not recorded"
    else:
        eff = precision_name(effective, _finite(info.get("fp8_coverage")) if str(effective).startswith("fp8") else None)
    if eff.startswith("fp8") and info.get("fp8_skipped"):
        kept = [n for names in (info["fp8_skipped"] or {}).values() for n in names]
        if kept:
            eff += f"; kept in higher precision: {', '.join(map(str, kept[:6]))}" + (" ..." if len(kept) > 6 else "")
    return (precision_id(str(requested)) if requested else "default of the launch config"), eff


@dataclass
class DatasetInfo:
    """The training data as the shards' own manifest names it."""

    description: str
    """Markdown for prose: '`HuggingFaceFW/fineweb-edu` (`sample-10BT`)', 'Python's pydoc help topics ...'."""
    hub_id: str | None
    """Hub dataset id (front matter ``datasets:``), when the data came from the Hub."""
    name: str
    """Plain name for the model-index (no Markdown)."""
    type: str
    """model-index ``dataset.type``: the Hub id, else a slug saying what it is."""
    config: str | None = None


def _files_desc(files: list[Any]) -> str:
    names = [Path(f[0] if isinstance(f, (list, tuple)) else str(f)).name for f in files]
    shown = ", ".join(f"`{n}`" for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{len(names)} local file(s) ({shown})" if names else "local files"


def dataset_info(cfg: dict[str, Any], info: dict[str, Any]) -> DatasetInfo:
    """What the run trained on, from ``DATA_DIR/manifest.json`` (prepare-data's record of its source)."""
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
            path, conf = str(source["path"]), source.get("config")
            sub = f" (`{conf}`)" if conf else ""
            return DatasetInfo(f"`{path}`{sub}", path, f"{path}" + (f" ({conf})" if conf else ""), path, conf)
        if kind == "embedded":
            return DatasetInfo("Python's `pydoc` help topics (the project's embedded quickstart corpus)",
                               None, "Python pydoc help topics (embedded quickstart corpus)", "pydoc-help-topics")
        if kind == "files":
            desc = _files_desc(source.get("files") or [])
            return DatasetInfo(desc, None, desc.replace("`", ""), "local-files")
    if not data_dir:
        return DatasetInfo("the project's embedded quickstart corpus", None, "embedded quickstart corpus",
                           "pydoc-help-topics")
    name = Path(data_dir).name
    return DatasetInfo(f"token shards from `{name}`", None, f"token shards from {name}", "local-token-shards")


def front_matter(rec: RunRecord, *, name: str, license: str, data: DatasetInfo) -> str:
    """YAML metadata in the Hub's schema, with a ``model-index`` of this run's evaluation results (built with
    huggingface_hub's ModelCardData/EvalResult, the Hub's own model of it)."""
    from huggingface_hub import EvalResult, ModelCardData

    results = []
    if rec.val_loss is not None:
        results.append(EvalResult(
            task_type="text-generation", task_name="Language modeling", dataset_type=data.type,
            dataset_name=f"{data.name}, validation split", dataset_config=data.config, dataset_split="validation",
            metric_type="loss", metric_value=round(rec.val_loss, 4),
            metric_name=f"validation loss (nats/token, step {rec.val_loss_step})"))
    if rec.hellaswag_acc_norm is not None:
        args = {"num_few_shot": 0, **({"num_examples": rec.hellaswag_count} if rec.hellaswag_count else {})}
        for metric, value in (("acc", rec.hellaswag_acc), ("acc_norm", rec.hellaswag_acc_norm)):
            if value is not None:
                results.append(EvalResult(
                    task_type="text-generation", task_name="Commonsense completion (0-shot)",
                    dataset_type="Rowan/hellaswag", dataset_name="HellaSwag", dataset_split="validation",
                    dataset_args=args, metric_type=metric, metric_value=round(value, 4),
                    metric_name=f"HellaSwag {metric}" + (f" ({rec.hellaswag_count:,} examples)"
                                                         if rec.hellaswag_count else "")))
    card = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation", license=license, language=["en"],
        tags=["gpt2", "text-generation", "causal-lm", "pretrained-from-scratch", CARD_TAG],
        datasets=[data.hub_id] if data.hub_id else None, model_name=name, eval_results=results or None)
    return card.to_yaml().strip()


def _fmt_hardware(info: dict[str, Any]) -> str:
    if info.get("hardware"):
        return str(info["hardware"])
    device, world = info.get("device_name") or info.get("device"), info.get("world_size")
    if not device:
        return "not recorded"
    return f"{device} x {world}" if world else str(device)


def render_model_card(rec: RunRecord, *, repo_ref: str, license: str, n_params: int, has_curve: bool,
                      title: str = "") -> str:
    """The README.md of an export: YAML front matter + what it is, how to load, recipe, results, license."""
    cfg, info = rec.config, rec.run_info
    m, o = cfg.get("model") or {}, cfg.get("optim") or {}
    preset = cfg.get("preset") or "custom"
    data = dataset_info(cfg, info)
    requested, effective = _precision(info, cfg)
    name = title or (cfg.get("run") or {}).get("run_name") or "gpt2"
    front = front_matter(rec, name=name, license=license, data=data)

    def res(v: float | None, fmt: str) -> str:
        return format(v, fmt) if v is not None else "not measured"

    hs = res(rec.hellaswag_acc_norm, ".4f")
    if rec.hellaswag_acc_norm is not None and rec.hellaswag_count:
        hs += f" ({rec.hellaswag_count:,} examples)"
    versions = info.get("versions") or info.get("package_versions") or {}
    versions_txt = ", ".join(f"{k} {v}" for k, v in versions.items()) if isinstance(versions, dict) else ""
    world = info.get("world_size")
    batch = o.get("total_batch_size")
    lines = [
        "---", front, "---", "",
        f"# {name}", "",
        f"A GPT-2 language model ({m.get('n_layer')} layers, {m.get('n_head')} heads, hidden size "
        f"{m.get('n_embd')}, context {m.get('n_positions')} tokens, {n_params / 1e6:.1f}M parameters) pretrained "
        f"from scratch on {data.description} with `hf-gpt2-train` (GPT-2 pretraining on HuggingFace Accelerate). "
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
        f"| validation loss (nats/token, held-out split of the training data) | {res(rec.val_loss, '.4f')}"
        + (f" (at step {rec.val_loss_step:,})" if rec.val_loss_step is not None else "") + " |",
        f"| HellaSwag acc_norm (completion-style, 0-shot) | {hs} |",
        f"| HellaSwag acc | {res(rec.hellaswag_acc, '.4f')} |", "",
        "## Training", "",
        "| setting | value |", "| --- | --- |",
        f"| data | {data.description} |",
        f"| preset | `{preset}` |",
        f"| checkpoint | `{rec.tier}` at optimizer step {rec.step:,} of {_fmt_int(o.get('max_steps'))} |",
        f"| tokens seen | {_fmt_int(rec.tokens_seen)} |",
        f"| batch | {_fmt_int(batch)} tokens per step, sequences of {o.get('seq_len')} tokens |",
        f"| optimizer | {_optimizer_line(o)} |",
        f"| precision requested | {requested} |",
        f"| precision in effect | {effective} |",
        f"| hardware | {_fmt_hardware(info)} |",
        f"| processes (world size) | {world if world is not None else 'not recorded'} |",
        f"| training time | {_fmt_hours(rec.wall_time_s)} |",
    ]
    if versions_txt:
        lines.append(f"| software | {versions_txt} |")
    lines.append("")
    if has_curve:
        lines += ["![Training loss (smoothed) and validation loss by optimizer step](loss_curve.png)", ""]
    size = "small " if n_params < 400e6 else ""
    lines += [
        "## Limitations", "",
        f"A {size}base model pretrained only on {data.description}, with no instruction tuning or safety "
        "filtering: it continues text in the style of that data, often incorrectly, knows little beyond it, and "
        "can reproduce biases of its training data. It is not a chat or instruction-following model.", "",
        "## License", "",
        f"The model weights are released under the `{license}` license.", "",
    ]
    return "\n".join(lines)


def _optimizer_line(o: dict[str, Any]) -> str:
    """The recipe's optimizer and schedule as a run recorded them (runs from before --optimizer: AdamW, cosine)."""
    adamw = f"AdamW (betas {o.get('adam_beta1')}/{o.get('adam_beta2')}, weight decay {o.get('weight_decay')})"
    if o.get("optimizer", "adamw") == "muon":
        text = (f"Muon on the block matrices (peak lr {o.get('muon_learning_rate')}, momentum {o.get('muon_momentum')}, "
                f"weight decay {o.get('muon_weight_decay')}) + {adamw} on embeddings, biases and LayerNorms, peak lr "
                f"{o.get('learning_rate')}")
    else:
        text = f"{adamw}, peak lr {o.get('learning_rate')}"
    if o.get("lr_schedule", "cosine") == "wsd":
        decay = f"warmup-stable-decay, 1-sqrt decay over the last {o.get('decay_fraction')} of the run to {o.get('min_lr_ratio')}x"
    else:
        decay = f"cosine decay to {o.get('min_lr_ratio')}x"
    return f"{text}, {o.get('warmup_steps')} warmup steps, {decay}"
