"""Configuration: one dataclass per concern, presets, YAML files and CLI flags.

Precedence (lowest to highest): dataclass defaults < ``--preset`` < ``--config FILE`` < CLI flags.
The docstring under each field is its ``--help`` text. YAML files hold one mapping per section
(``model:``, ``data:``, ``optim:``, ...) or flat keys; unknown keys are rejected, and every problem
found is reported at once. The sections themselves are in ``sections.py``; everything is imported from here.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from hf_gpt2_train.config.sections import (
    SECTIONS,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    HubConfig,
    ModelConfig,
    OptimConfig,
    PrecisionConfig,
    ResilienceConfig,
    RunConfig,
    TrackingConfig,
)

__all__ = ["PRESETS", "SECTIONS", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "EvalConfig", "HubConfig",
           "ModelConfig", "OptimConfig", "PrecisionConfig", "ResilienceConfig", "RunConfig", "TrackingConfig",
           "apply_overrides", "build_config", "field_docs", "flat_fields", "load_yaml", "parse_auto_bool", "parse_bool"]


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    preset: str = ""

    def to_dict(self, redact: bool = False) -> dict[str, Any]:
        """Plain dict of every field; ``redact=True`` for anything written or logged (tokens -> <redacted>)."""
        d = dataclasses.asdict(self)
        if redact:
            from hf_gpt2_train.redact import redact_secrets

            d = redact_secrets(d)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Rebuild a Config saved by to_dict (e.g. from a checkpoint manifest)."""
        cfg = cls(preset=d.get("preset", ""))
        apply_overrides(cfg, {k: v for k, v in d.items() if k != "preset"}, source="saved config")
        return cfg

    def grad_accum_steps(self, world_size: int) -> int:
        o = self.optim
        assert isinstance(o.per_device_train_batch_size, int), "resolve per_device_train_batch_size auto first"
        return o.total_batch_size // (o.per_device_train_batch_size * o.seq_len * world_size)

    def fit_micro_batch(self, world_size: int) -> str | None:
        """Lower ``per_device_train_batch_size`` to the largest value that divides the batch on ``world_size``.

        ``total_batch_size`` (the recipe) is kept; the micro-batch is a memory knob. Returns the line to log
        when it changed it; None when the requested one fits, or when none fits (``validate`` reports that).
        """
        o = self.optim
        requested, per_micro = o.per_device_train_batch_size, o.seq_len * world_size
        if not isinstance(requested, int) or requested < 1 or o.seq_len < 1 or o.total_batch_size % (requested * per_micro) == 0:
            return None
        fits = [b for b in range(requested - 1, 0, -1) if o.total_batch_size % (b * per_micro) == 0]
        if not fits:
            return None
        o.per_device_train_batch_size = fits[0]
        return (f"per_device_train_batch_size {requested} -> {fits[0]}: {requested}*{o.seq_len}*{world_size} "
                f"process(es) does not divide total_batch_size {o.total_batch_size}; {fits[0]} is the largest "
                f"micro-batch that does ({self.grad_accum_steps(world_size)} accumulation step(s))")

    def validate(self, world_size: int = 1) -> None:
        """Raise ConfigError listing every problem at once."""
        p: list[str] = []
        o, m = self.optim, self.model
        if o.seq_len > m.n_positions:
            p.append(f"seq_len {o.seq_len} exceeds the model's context n_positions={m.n_positions}: lower --seq_len")
        if m.n_embd % m.n_head:
            p.append(f"n_embd {m.n_embd} is not divisible by n_head {m.n_head}")
        auto = o.per_device_train_batch_size == "auto"  # resolved by memory.resolve_micro_batch: any divisor may be chosen
        micro = (1 if auto else o.per_device_train_batch_size) * o.seq_len * world_size
        if not auto and not isinstance(o.per_device_train_batch_size, int):
            p.append(f"per_device_train_batch_size must be a number or 'auto', not {o.per_device_train_batch_size!r}")
        elif (not auto and o.per_device_train_batch_size < 1) or o.seq_len < 1:
            p.append("per_device_train_batch_size and seq_len must be >= 1")
        elif o.total_batch_size % (o.seq_len * world_size):
            step = o.seq_len * world_size
            p.append(
                f"total_batch_size {o.total_batch_size} is not a multiple of seq_len*num_processes = "
                f"{o.seq_len}*{world_size} = {step}, so no micro-batch size fits: use a multiple of {step} for "
                "--total_batch_size"
            )
        elif o.total_batch_size % micro:
            p.append(
                f"total_batch_size {o.total_batch_size} is not divisible by per_device_train_batch_size*seq_len*"
                f"num_processes = {o.per_device_train_batch_size}*{o.seq_len}*{world_size} = {micro}: "
                f"use a multiple of {micro} for --total_batch_size"
            )
        if o.max_steps < 1:
            p.append("max_steps must be >= 1")
        if self.run.activation_checkpointing not in ("none", "full", "selective") or self.run.activation_checkpointing_every < 1:
            p.append(f"activation_checkpointing must be none/full/selective (not {self.run.activation_checkpointing!r}) "
                     f"and activation_checkpointing_every >= 1 (not {self.run.activation_checkpointing_every})")
        if o.on_nonfinite not in ("stop", "skip"):
            p.append(f"on_nonfinite must be 'stop' or 'skip', not {o.on_nonfinite!r}")
        if o.optimizer not in ("adamw", "muon"):
            p.append(f"optimizer must be 'adamw' or 'muon', not {o.optimizer!r}")
        if o.muon_learning_rate < 0 or not 0 <= o.muon_momentum < 1 or o.muon_weight_decay < 0:
            p.append("muon_learning_rate and muon_weight_decay must be >= 0 and muon_momentum in [0, 1)")
        if o.lr_schedule not in ("cosine", "wsd"):
            p.append(f"lr_schedule must be 'cosine' or 'wsd', not {o.lr_schedule!r}")
        if not 0 <= o.decay_fraction <= 1:
            p.append(f"decay_fraction must be in [0, 1], not {o.decay_fraction}")
        if o.decay_now and (o.lr_schedule != "wsd" or not 0 < o.decay_fraction < 1
                            or not self.checkpoint.resume_from_checkpoint):
            p.append("--decay_now starts the cooldown of a resumed run: it needs --lr_schedule wsd, a decay_fraction "
                     "between 0 and 1 and --resume_from_checkpoint")
        mp = self.precision.mixed_precision
        if mp is not None and mp not in ("no", "fp16", "bf16", "fp8"):
            p.append(f"mixed_precision must be one of no/fp16/bf16/fp8, not {mp!r}")
        if self.precision.fp8_backend not in ("auto", "te", "ao"):
            p.append(f"fp8_backend must be auto/te/ao, not {self.precision.fp8_backend!r}")
        if self.checkpoint.keep_last < 1:
            p.append("keep_last must be >= 1")
        r = self.resilience
        if r.outlier_window < 16:
            p.append(f"outlier_window must be >= 16 (a robust spread needs values), not {r.outlier_window}")
        if not 8 <= r.outlier_min_steps <= r.outlier_window:
            p.append(f"outlier_min_steps must be between 8 and outlier_window ({r.outlier_window}), not "
                     f"{r.outlier_min_steps}")
        if min(r.loss_z_threshold, r.grad_norm_z_threshold, r.spike_z_threshold) <= 0:
            p.append("loss_z_threshold, grad_norm_z_threshold and spike_z_threshold must be > 0")
        if r.grad_norm_spike_ratio <= 1:
            p.append(f"grad_norm_spike_ratio must be > 1, not {r.grad_norm_spike_ratio}")
        if r.rollback_after < 0 or r.max_rollbacks < 0:
            p.append("rollback_after and max_rollbacks must be >= 0 (0 turns rollbacks off)")
        if r.collective_timeout_minutes <= 0:
            p.append("collective_timeout_minutes must be > 0")
        elif r.hang_timeout_minutes >= r.collective_timeout_minutes:
            p.append(f"hang_timeout_minutes {r.hang_timeout_minutes:g} must be shorter than collective_timeout_minutes "
                     f"{r.collective_timeout_minutes:g}, or a hung collective fails before the watchdog dumps stacks")
        if self.hub.push_to_hub and not self.hub.hub_model_id:
            p.append("--push_to_hub needs --hub_model_id USER/NAME")
        if self.hub.hub_strategy not in ("end", "every_save", "checkpoint", "all_checkpoints"):
            p.append(f"hub_strategy must be end/every_save/checkpoint/all_checkpoints, not {self.hub.hub_strategy!r}")
        if str(self.checkpoint.resume_from_checkpoint or "").strip().lower() == "hub" and not self.hub.hub_model_id:
            p.append("--resume_from_checkpoint hub needs --hub_model_id USER/NAME (the repository to resume from)")
        if p:
            raise ConfigError("; ".join(p), every_process=True)


# --------------------------------------------------------------------------------------------- presets
# build-nanogpt's recipe: 524,288-token batches, lr 6e-4, 715 warmup, cosine to 10%, wd 0.1, 19,073 steps.
# The dataclass defaults are that recipe; presets set the model shape and a micro-batch that fits 80 GB.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": {"model": {"n_layer": 12, "n_head": 12, "n_embd": 768}},
    "gpt2-medium": {"model": {"n_layer": 24, "n_head": 16, "n_embd": 1024}, "optim": {"per_device_train_batch_size": 32}},
    "gpt2-large": {"model": {"n_layer": 36, "n_head": 20, "n_embd": 1280}, "optim": {"per_device_train_batch_size": 16}},
    "gpt2-xl": {"model": {"n_layer": 48, "n_head": 25, "n_embd": 1600}, "optim": {"per_device_train_batch_size": 8}},
    # A tiny GPT-2 that visibly learns on 2 CPU cores in about two minutes, on the embedded corpus.
    "quickstart": {
        "model": {"n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 128},
        "optim": {
            "max_steps": 120,
            "learning_rate": 4e-3,
            "warmup_steps": 10,
            "total_batch_size": 1024,
            "per_device_train_batch_size": 16,
            "seq_len": 64,
        },
        "data": {"val_batches": 4},
        "checkpoint": {"checkpoint_steps": 40},
        "tracking": {"logging_steps": 10},
        # HellaSwag needs a download: off, so the quickstart runs offline (--hellaswag_path FILE turns it on).
        "eval": {"eval_steps": 60, "hellaswag": False, "hellaswag_limit": 100, "sample_max_new_tokens": 24},
    },
}


# ------------------------------------------------------------------------------------ field metadata
@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field (it becomes --help)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for a, b in zip(body, body[1:], strict=False):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = str(b.value.value)  # type: ignore[union-attr]
    return docs


def flat_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """Flat flag name -> (section, field). Field names are unique across sections."""
    out: dict[str, tuple[str, dataclasses.Field]] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in out, f"duplicate config field {f.name}"
            out[f.name] = (section, f)
    return out


def parse_bool(value: Any) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case); ValueError otherwise."""
    if isinstance(value, bool):
        return value
    s = str(value).lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {value!r}")


def parse_auto_bool(value: Any) -> bool | None:
    """As ``parse_bool``, or 'auto' (any case): None, the default chosen at run time."""
    return None if isinstance(value, str) and value.strip().lower() == "auto" else parse_bool(value)


def _coerce(value: Any, f: dataclasses.Field) -> Any:
    """``value`` as the field's type; the ConfigError names the field (its caller adds where it came from)."""
    t = str(f.type)
    if value is None:
        if "None" in t:
            return None
        raise ConfigError(f"{f.name} may not be null")
    try:
        if t == "int | str":  # a number or a keyword ('auto')
            return value.strip().lower() if isinstance(value, str) and not value.strip().lstrip("-").isdigit() else int(value)
        if t == "bool | None":  # a true/false/auto switch
            return parse_auto_bool(value)
        if t.startswith("bool"):
            return parse_bool(value)
        if t.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if t.startswith("float"):
            return float(value)
        if t.startswith("list"):
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{f.name}={value!r} is not a valid {t}") from None


def apply_overrides(cfg: Config, overrides: dict[str, Any], source: str) -> None:
    """Apply nested ({section: {key: v}}) or flat ({key: v}) overrides; report every unknown/bad key at once."""
    fields = flat_fields()
    problems: list[str] = []
    flat: list[tuple[str, Any]] = []
    for k, v in overrides.items():
        if k in SECTIONS and isinstance(v, dict):
            cls_fields = {f.name for f in dataclasses.fields(SECTIONS[k])}
            for kk, vv in v.items():
                if kk in cls_fields:
                    flat.append((kk, vv))
                else:
                    problems.append(f"unknown key {k}.{kk}")
        elif k == "preset":
            continue
        elif k in fields:
            flat.append((k, v))
        else:
            problems.append(f"unknown key {k!r}")
    from hf_gpt2_train.redact import REDACTED, is_secret_key

    for k, v in flat:
        section, f = fields[k]
        if v == REDACTED and is_secret_key(k):
            continue  # a config read back from run_info.json/a manifest: the secret was never stored
        try:
            setattr(getattr(cfg, section), k, _coerce(v, f))
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems) + " (see --help for valid keys)")


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist: check the --config path")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {p} is not valid YAML{where}: fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections/keys, not {type(data).__name__}")
    return data


def _keys_given(overrides: dict[str, Any]) -> set[str]:
    """Field names set by nested ({section: {key: v}}) or flat overrides."""
    keys: set[str] = set()
    for k, v in overrides.items():
        keys |= set(v) if k in SECTIONS and isinstance(v, dict) else {k}
    return keys


def build_config(preset: str = "", yaml_path: str = "", cli: dict[str, Any] | None = None) -> Config:
    """Defaults < preset < YAML < CLI."""
    file_data = load_yaml(yaml_path) if yaml_path else {}
    preset = preset or str(file_data.get("preset", "") or "")
    cfg = Config(preset=preset)
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
        apply_overrides(cfg, PRESETS[preset], source=f"preset {preset}")
    if file_data:
        apply_overrides(cfg, file_data, source=str(yaml_path))
    if cli:
        apply_overrides(cfg, cli, source="command line")
    given = _keys_given(file_data) | _keys_given(cli or {})
    if "hellaswag_path" in given and cfg.eval.hellaswag_path and "hellaswag" not in given:
        cfg.eval.hellaswag = True  # a HellaSwag file turns HellaSwag on (the quickstart preset has it off)
    from hf_gpt2_train.redact import register_secret

    register_secret(cfg.hub.hub_token)
    if not cfg.run.run_name:
        cfg.run.run_name = Path(cfg.run.output_dir).resolve().name or "run"
    return cfg
