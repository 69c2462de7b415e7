"""GPT-2 as a transformers ``GPT2LMHeadModel``, in the layout we train it in.

Training layout: HF GPT-2 builds its attention/MLP projections from ``Conv1D`` (weight ``[in, out]``).
fp8 backends (TransformerEngine, torchao) only convert ``nn.Linear``, so we always train with the block
projections as ``nn.Linear`` (weight ``[out, in]``: the Conv1D weight transposed). Doing it for every
precision keeps checkpoints identical across bf16/fp8, so a run can resume in either.
``to_hf_state_dict`` turns a training state dict back into the stock HF layout for export.

The vocabulary is padded (50257 -> 50304) for matmul efficiency; padded rows are sliced off the logits
before the loss and before sampling, so they never get probability mass.

Training forward: ``GPT2TrainingModel(input_ids=x, targets=y)`` returns the mean next-token loss, a scalar.
Under ``torch.compile`` (``setup_training_forward``) each ``GPT2Block`` is compiled on its own (compiling the
whole model makes transformers build a ``[B,1,T,T]`` mask, so SDPA runs with ``is_causal=False`` and no
FlashAttention; per block, the mask is never built and SDPA gets ``is_causal=True``), and lm_head +
cross-entropy are one compiled function, so the logits never leave it: no fp32 copy of them exists
(Accelerate's ``convert_outputs_to_fp32`` only sees the scalar) and the log-softmax is fused into the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from hf_gpt2_train.config import ModelConfig

# The block matmuls that carry almost all FLOPs (and that fp8 converts).
BLOCK_PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def hf_config(cfg: ModelConfig, padded: bool = True) -> GPT2Config:
    return GPT2Config(
        vocab_size=cfg.padded_vocab_size if padded else cfg.vocab_size,
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=50256,
        eos_token_id=50256,
        tie_word_embeddings=True,
        use_cache=False,
    )


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace every HF ``Conv1D`` by an equivalent ``nn.Linear`` (same math, weight transposed)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                in_f, out_f = child.weight.shape
                lin = nn.Linear(in_f, out_f, bias=child.bias is not None, device=child.weight.device,
                                dtype=child.weight.dtype)
                with torch.no_grad():
                    lin.weight.copy_(child.weight.t())
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(module, child_name, lin)
    return model


class GPT2TrainingModel(GPT2LMHeadModel):
    """``GPT2LMHeadModel`` whose ``forward(input_ids, targets=...)`` returns the mean next-token loss.

    Same modules, parameter names and state dict as the stock class, so checkpoints, export, eval and
    ``load_trained_model`` do not change. The loss path goes through the (prepared, possibly DDP/FSDP-wrapped)
    model like any forward, so gradient synchronisation works. Without ``targets`` it is the stock forward
    (logits over the padded vocabulary; callers slice ``[..., :vocab_size]``, see ``lm_logits``), run eagerly
    even when the blocks are compiled: evaluation, sampling and HellaSwag call it at shapes that change from
    call to call (sampling grows by one token per call), which would recompile every time.
    """

    def __init__(self, config: GPT2Config, real_vocab_size: int | None = None):
        super().__init__(config)
        self.real_vocab_size = real_vocab_size or config.vocab_size
        """Rows of the (padded) lm_head that are real tokens; the rest never get probability mass."""
        self.padded_logits = False
        """Loss GEMM over all padded rows (True) or the real rows only (False); see ``lm_head_loss``."""
        self.head_loss = lm_head_loss
        """lm_head + cross entropy; ``setup_training_forward`` replaces it by its compiled version."""

    def forward(self, input_ids: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs):
        if targets is None:
            # Traced from outside (someone compiled the whole model): the outer compile decides. torch < 2.6 has
            # no set_stance: there the compiled blocks run here too (recompiling per shape, then falling back).
            if torch.compiler.is_compiling() or not hasattr(torch.compiler, "set_stance"):
                return super().forward(input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs)
            with torch.compiler.set_stance("force_eager"):
                return super().forward(input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs)
        hidden = self.transformer(input_ids=input_ids, **kwargs).last_hidden_state
        return self.head_loss(self.lm_head, hidden, targets, self.real_vocab_size, self.padded_logits)


def lm_head_loss(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                 padded: bool) -> torch.Tensor:
    """Mean next-token cross entropy of ``lm_head(hidden)`` over the real vocabulary: a scalar.

    ``padded=True``: the GEMM runs over all ``padded_vocab_size`` rows (N = 50304, a multiple of 64, the point of
    the padding) and the padded columns are sliced off before the softmax, so they get no probability mass.
    Compiled, the slice is read in place by the fused log-softmax and its gradient (zeros for the padded
    columns) is written by the same kernel: neither costs a copy. ``padded=False``: the GEMM runs over the real
    rows only (``weight[:vocab_size]`` is a contiguous view, N = 50257); eagerly that is cheaper, because
    slicing padded logits copies the largest activation of the model before the loss. An lm_head that is not a
    plain ``nn.Linear`` (torchao fp8 with ``--fp8_lm_head``: fp8 GEMMs need dims divisible by 16) always
    computes padded logits.
    """
    if padded or type(lm_head) is not nn.Linear:
        logits = lm_head(hidden)[..., :vocab_size]
    else:
        logits = F.linear(hidden, lm_head.weight[:vocab_size])
    return F.cross_entropy(logits.float().reshape(-1, vocab_size), targets.reshape(-1))


def setup_training_forward(model: GPT2TrainingModel, use_compile: bool, padded_logits: bool | None = None,
                           compile_blocks: bool = True, **compile_kwargs) -> GPT2TrainingModel:
    """Choose the loss GEMM width and compile the training forward, in place (call before ``accelerator.prepare``).

    ``padded_logits`` None means: padded with compile, real-vocabulary rows without (see ``lm_head_loss``).
    With ``use_compile``, each ``GPT2Block`` (unless ``compile_blocks`` is False: TransformerEngine, see
    ``precision.PrecisionPlan.compile_blocks``) and the lm_head + loss function are compiled. Parameter names
    and the state dict do not change (``nn.Module.compile`` keeps the module, no ``_orig_mod.``), and
    ``fully_shard`` applied afterwards still wraps each block (Accelerate's own FSDP2 regional compile uses
    ``module.compile()`` for the same reason). All blocks share one compiled graph. ``compile_kwargs`` go to
    ``torch.compile`` (tests pass a ``backend`` that records the graphs).
    """
    model.padded_logits = use_compile if padded_logits is None else padded_logits
    if use_compile:
        if compile_blocks:
            for block in model.transformer.h:
                block.compile(**compile_kwargs)
        model.head_loss = torch.compile(lm_head_loss, **compile_kwargs)
    return model


def build_model(cfg: ModelConfig, seed: int | None = None) -> GPT2TrainingModel:
    """A freshly initialised GPT-2 (HF's GPT-2 init, scaled residual projections) in the training layout."""
    if seed is not None:
        torch.manual_seed(seed)
    hf_cfg = hf_config(cfg)
    hf_cfg._attn_implementation = "sdpa"
    model = GPT2TrainingModel(hf_cfg, real_vocab_size=cfg.vocab_size)  # lm_head is tied to wte, as in GPT-2
    return conv1d_to_linear(model)


def is_transposed_key(key: str) -> bool:
    return key.endswith(".weight") and any(f".{p}." in key for p in BLOCK_PROJECTIONS)


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Training-layout state dict -> stock HF GPT-2 (Conv1D weights, vocab trimmed to cfg.vocab_size)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        k = k.removeprefix("_orig_mod.").removeprefix("module.")
        if k.endswith("._extra_state") or k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue  # TE fp8 metadata / legacy causal-mask buffers are not weights
        v = v.detach().to("cpu")
        if is_transposed_key(k):
            v = v.t()
        if k in ("transformer.wte.weight", "lm_head.weight"):
            v = v[: cfg.vocab_size]
        out[k] = v.contiguous()
    if "lm_head.weight" not in out and "transformer.wte.weight" in out:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def lm_logits(model: nn.Module, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits over the real vocabulary only (for evaluation: the padded columns are sliced off)."""
    return model(input_ids=input_ids).logits[..., :vocab_size]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross entropy on logits (not HF's labels= path, which breaks the compiled graph)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)


def num_params(cfg: ModelConfig, non_embedding: bool = True) -> int:
    d, L = cfg.n_embd, cfg.n_layer
    per_block = 12 * d * d + 13 * d  # qkv+proj (4d^2+4d), mlp (8d^2+5d), 2 layernorms (4d)
    n = L * per_block + 2 * d  # + final layernorm
    if not non_embedding:
        n += cfg.padded_vocab_size * d + cfg.n_positions * d
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward+backward), PaLM appendix B: 6*N + 12*L*d*T.

    N counts the matmul weights including lm_head (the tied embedding used as the output projection);
    the attention term covers QK^T and AV. Layernorms, softmax and the input embedding lookup are ignored.
    """
    d, L = cfg.n_embd, cfg.n_layer
    n_matmul = L * 12 * d * d + cfg.padded_vocab_size * d
    return 6.0 * n_matmul + 12.0 * L * d * seq_len


def matmul_flops_by_layer(cfg: ModelConfig) -> dict[str, float]:
    """Forward matmul FLOPs per token of each weight matmul (for fp8 coverage)."""
    d = cfg.n_embd
    out: dict[str, float] = {}
    for i in range(cfg.n_layer):
        out[f"transformer.h.{i}.attn.c_attn"] = 2.0 * d * 3 * d
        out[f"transformer.h.{i}.attn.c_proj"] = 2.0 * d * d
        out[f"transformer.h.{i}.mlp.c_fc"] = 2.0 * d * 4 * d
        out[f"transformer.h.{i}.mlp.c_proj"] = 2.0 * 4 * d * d
    out["lm_head"] = 2.0 * d * cfg.padded_vocab_size
    return out


def load_trained_model(path: str, device: str = "cpu") -> tuple[GPT2LMHeadModel, ModelConfig]:
    """Rebuild a model from a checkpoint folder (training layout + manifest.json) or an HF export folder.

    Returns the model (eval mode) and its ModelConfig. HF folders load as stock Conv1D GPT-2, which
    computes the same function, so evaluation code works on either.
    """
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from hf_gpt2_train.config import ConfigError

    p = Path(path)
    if (p / "manifest.json").is_file() and (p / "model.safetensors").is_file():
        manifest = json.loads((p / "manifest.json").read_text())
        mcfg = ModelConfig(**manifest["config"]["model"])
        model = build_model(mcfg)
        state = load_file(str(p / "model.safetensors"), device="cpu")
        state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()
                 if not k.endswith("._extra_state")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in ("lm_head.weight", "transformer.wte.weight")]
        if missing or unexpected:
            raise ConfigError(f"{p} does not match its manifest's model shape (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}): pass the checkpoint this run wrote")
        model.tie_weights()
    elif (p / "config.json").is_file():
        model = GPT2LMHeadModel.from_pretrained(str(p))
        c = model.config
        mcfg = ModelConfig(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_positions=c.n_positions,
                           vocab_size=min(c.vocab_size, 50257), pad_vocab_multiple=1)
    else:
        raise ConfigError(f"{p} is neither a checkpoint (manifest.json + model.safetensors) nor an HF model "
                          "folder (config.json): pass a checkpoint folder or an export")
    return model.to(device).eval(), mcfg
