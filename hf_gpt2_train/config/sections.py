"""The configuration's sections: one dataclass per concern, the docstring under each field its ``--help`` text.

``Config`` (``hf_gpt2_train.config``) holds one of each; ``SECTIONS`` names them as YAML files and flags do.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
