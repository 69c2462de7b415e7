"""Configuration: one dataclass per concern, presets, YAML files and CLI flags.

Precedence (lowest to highest): dataclass defaults < ``--preset`` < ``--config FILE`` < CLI flags.
The docstring under each field is its ``--help`` text. YAML files hold one mapping per section
(``model:``, ``data:``, ``optim:``, ...) or flat keys; unknown keys are rejected, and every problem
found is reported at once.
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


class ConfigError(ValueError):
    """Bad user input: printed as one line, exit code 2.

    ``every_process=True`` marks an error that every process of a launch raises alike (a check of the
    configuration itself, or one the processes agreed on), so only the main process prints it.
    """

    def __init__(self, message: str, *, every_process: bool = False):
        super().__init__(message)
        self.every_process = every_process


@dataclass
class ModelConfig:
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block."""
    n_embd: int = 768
    """Hidden size."""
    n_positions: int = 1024
    """Context length of the model (position embeddings); seq_len may not exceed it."""
    vocab_size: int = 50257
    """Real vocabulary size (tiktoken gpt2: 50257)."""
    pad_vocab_multiple: int = 64
    """Pad the embedding/lm_head rows to a multiple of this (50257 -> 50304); padded rows are never predicted."""
    dropout: float = 0.0
    """Dropout for embeddings, attention and residuals (0 for pretraining)."""

    @property
    def padded_vocab_size(self) -> int:
        m = max(1, self.pad_vocab_multiple)
        return (self.vocab_size + m - 1) // m * m


@dataclass
class DataConfig:
    data_dir: str = ""
    """Folder of token shards (ours, build-nanogpt edufineweb_*.npy or llm.c .bin). Empty: the embedded corpus, prepared on first use."""
    shuffle: bool = True
    """Seeded shuffle of the training windows each epoch (restored exactly on resume)."""
    val_batches: int = 20
    """Number of fixed validation micro-batches (per process) for val_loss."""
    tokenizer_file: str = ""
    """Another GPT-2 vocabulary file (gpt2.tiktoken ranks); default: the one shipped in the package."""
    verify_data_checksums: bool = True
    """Before training, compare every shard's bytes with the xxh3_128 checksum prepare-data recorded (once per copy of the data: later starts see it unchanged and skip it); sizes and headers are always checked."""
    resume_on_other_data: bool = False
    """Resume from a checkpoint on data other than the run's (a cleaned or re-mixed copy with the same number of training windows): the stream position, seed and skipped ranges carry over, with a warning naming the difference. Off: such a resume is refused."""


@dataclass
class OptimConfig:
    max_steps: int = 19073
    """Optimizer steps to train for."""
    learning_rate: float = 6e-4
    """Peak learning rate (after warmup)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at learning_rate * min_lr_ratio."""
    warmup_steps: int = 715
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to 2-D weights only."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    total_batch_size: int = 524288
    """Tokens per optimizer step across all processes; gradient accumulation is derived from it."""
    per_device_train_batch_size: int | str = 64
    """Micro-batch size (sequences) per process and forward pass; 'auto': on a GPU, the largest that fits and divides the batch, found before training (a resume keeps the checkpoint's; see docs/benchmarks.md, Memory)."""
    seq_len: int = 1024
    """Tokens per training sequence."""
    on_nonfinite: str = "stop"
    """What a non-finite loss/grad norm does: 'stop' (clear error, weights untouched) or 'skip' (skip that update)."""
    optimizer: str = "adamw"
    """'adamw', or 'muon': Muon (orthogonalised momentum) on the transformer blocks' weight matrices (Q, K and V separately) and AdamW on embeddings, biases and LayerNorms (docs/speed.md)."""
    muon_learning_rate: float = 0.02
    """Muon: peak lr of the block matrices (update scaled by sqrt(max(1, fan_out/fan_in))); same schedule as learning_rate, which stays the lr of the AdamW parameters."""
    muon_momentum: float = 0.95
    """Muon: Nesterov momentum."""
    muon_weight_decay: float = 0.01
    """Muon: decoupled weight decay of the block matrices (w -= lr * muon_weight_decay * w each step; weight_decay is AdamW's, far too strong at Muon's lr)."""
    lr_schedule: str = "cosine"
    """'cosine' (warmup, cosine to learning_rate*min_lr_ratio at max_steps) or 'wsd' (warmup, constant, then over the last decay_fraction of max_steps a 1-sqrt decay to learning_rate*min_lr_ratio)."""
    decay_fraction: float = 0.2
    """WSD: fraction of max_steps spent in the final decay."""
    decay_now: bool = False
    """WSD, with --resume_from_checkpoint: start the decay at the checkpoint's step (max_steps becomes the end of a decay of decay_fraction of the run); a checkpoint already in its decay continues it."""


@dataclass
class RunConfig:
    output_dir: str = "out"
    """Where checkpoints, logs, metrics and TensorBoard runs go."""
    run_name: str = ""
    """Name of the run (TensorBoard folder); default: the output folder's name."""
    seed: int = 1337
    """Seed for model init, data order and sampling."""
    compile: bool | None = None
    """torch.compile the training forward (default: on for GPU, off for CPU)."""
    padded_logits: bool | None = None
    """Loss GEMM over the padded vocabulary (padded columns kept out of the softmax) instead of the real 50257 rows (default: on with --compile, off without)."""
    device_peak_tflops: float = 0.0
    """Peak dense TFLOP/s for MFU (0: known GPUs are looked up; unknown devices report no MFU)."""
    activation_checkpointing: str = "none"
    """Recompute activations in the backward pass, per GPT2Block: 'none', 'full' (keep only each block's input: least memory, about 1/3 more block compute) or 'selective' (keep attention and every other matmul output; in between). Never the loss region."""
    activation_checkpointing_every: int = 1
    """With full/selective: checkpoint only every Nth GPT2Block (2: half of them, for about half the saving and half the recompute)."""


@dataclass
class PrecisionConfig:
    mixed_precision: str | None = None
    """'no' (fp32), 'fp16', 'bf16' or 'fp8' (default: the accelerate config's; with none, bf16 on a CUDA GPU with
    bf16, else fp32)."""
    fp8_backend: str = "auto"
    """fp8 backend: 'te' (TransformerEngine), 'ao' (torchao) or 'auto' (TE if usable, else torchao, else bf16)."""
    fp8_emulate: bool = False
    """torchao emulated fp8 (runs the fp8 path without fp8 hardware, CPU included; slow, for tests/debugging)."""
    fp8_lm_head: bool = False
    """Also run lm_head in fp8 (off: kept in bf16, as torchao recommends for the last layer)."""
    fp8_min_dim: int = 512
    """Linear layers with in/out features below this stay in bf16 (fp8 casts cost more than they save)."""


@dataclass
class CheckpointConfig:
    checkpoint_steps: int = 250
    """Save 'latest' every N steps (0 disables)."""
    checkpoint_minutes: float = 0.0
    """Also save 'latest' every N minutes (0: off); whichever comes first."""
    keep_last: int = 3
    """Rolling step_NNNNNNN checkpoints to keep."""
    milestone_steps: int = 0
    """Keep a milestone every N steps, never deleted (0: off; epoch ends are always milestones)."""
    resume_from_checkpoint: str | None = None
    """'latest', 'best', 'backup', 'auto' (latest if any, else fresh), 'hub' (the Hub repo's last-checkpoint/, needs --hub_model_id) or a checkpoint PATH."""
    verify_checkpoint: bool = True
    """Verify every checkpoint file's checksum (xxh3_128; sha256 in older checkpoints) on load, reading every byte in parallel with the load; sizes are always checked."""
    async_checkpoint: bool | None = None
    """Write checkpoints in the background: training pauses only to copy the state to host memory (one extra copy of weights + optimizer state in RAM). Default ('auto'): on for GPU runs; off on CPU, where training keeps every core busy and a background write does not pay (docs/benchmarks.md, Checkpoint I/O)."""


@dataclass
class TrackingConfig:
    report_to: str = "tensorboard"
    """Trackers: 'tensorboard', 'wandb', 'all' or 'none' (comma-separated lists work)."""
    logging_steps: int = 10
    """Log train scalars every N steps (the only steps that sync with the device)."""


@dataclass
class EvalConfig:
    eval_steps: int = 250
    """Evaluate (val loss, HellaSwag, samples) every N steps and at the end (0: only at the end)."""
    hellaswag: bool = True
    """Score HellaSwag at each evaluation (the quickstart preset: off unless --hellaswag_path is given)."""
    hellaswag_path: str = ""
    """Local hellaswag_val.jsonl (else downloaded once to the cache); giving one turns --hellaswag on."""
    hellaswag_limit: int = 0
    """Score only the first N HellaSwag examples (0: all 10,042)."""
    sample_prompts: list[str] = field(default_factory=lambda: ["Hello, I'm a language model,", "The meaning of life is"])
    """Fixed prompts for generated samples at each evaluation."""
    sample_max_new_tokens: int = 32
    """Tokens generated per sample."""
    sample_top_k: int = 50
    """Top-k for sampling."""


@dataclass
class HubConfig:
    push_to_hub: bool = False
    """Export and push the final model to the Hub at the end of training."""
    hub_model_id: str = ""
    """Hub repository id, e.g. user/gpt2-fineweb."""
    hub_private: bool = False
    """Create the Hub repository as private."""
    hub_token: str = ""
    """Hub token (else HF_TOKEN or the saved login)."""
    hub_strategy: str = "every_save"
    """With --push_to_hub, what is pushed while training (transformers Trainer's meanings): 'end' (only the final export), 'every_save' (the export at each save), 'checkpoint' (also the latest checkpoint in last-checkpoint/, to resume from), 'all_checkpoints' (every checkpoint in its own folder). Uploads run in the background."""


@dataclass
class ResilienceConfig:
    skip_outlier_updates: bool = True
    """Skip an update whose loss or grad norm is an outlier (z-score above loss_z_threshold/grad_norm_z_threshold against a robust baseline of the learned updates: median level, MAD spread), on the device like a non-finite one; from step outlier_min_steps+1 on (docs/resilience.md)."""
    outlier_window: int = 64
    """Learned updates the baseline's spread is estimated from (skipped and spiking updates are never learned); the grad norm is judged once this many were learned."""
    outlier_min_steps: int = 8
    """Learned updates needed before losses are judged (the guard is blind before; a few bad values among them cannot move the median baseline)."""
    loss_z_threshold: float = 6.0
    """Loss z-score above which the update is skipped (docs/resilience.md: how it was chosen)."""
    grad_norm_z_threshold: float = 8.0
    """Grad-norm z-score (of its log) above which the update is skipped, once outlier_window updates were learned (grad norms are heavier-tailed than the loss)."""
    grad_norm_spike_ratio: float = 16.0
    """A loss outlier whose grad norm is above this many times its level is an optimizer instability (the previous update), not bad data: its update is applied (clipped), not learned, and counts as spiking."""
    spike_z_threshold: float = 4.0
    """A step whose loss z-score is above this counts toward a sustained spike even when its update is applied, and is never learned into the baseline."""
    rollback_after: int = 10
    """This many consecutive spiking or skipped steps roll back, once the stretch ends (or has lasted 4x as long), to the newest checkpoint before it, skipping the data it read (0: never roll back)."""
    max_rollbacks: int = 3
    """Rollbacks allowed per run; a spike after that stops the run (exit code 4)."""
    hang_timeout_minutes: float = 0.0
    """No step completed for this long: every process dumps its threads' stacks to OUTPUT_DIR/hang/ and exits with code 5. 0: the larger of 30 min, 20x the median step and 1.5x the slowest step/eval/save seen; negative: off."""
    collective_timeout_minutes: float = 60.0
    """Timeout of every collective operation (init_process_group); must exceed the longest save, eval or end-of-run push."""


SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "precision": PrecisionConfig,
    "checkpoint": CheckpointConfig,
    "tracking": TrackingConfig,
    "eval": EvalConfig,
    "hub": HubConfig,
    "resilience": ResilienceConfig,
}


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
