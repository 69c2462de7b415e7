"""Mixed precision: what runs (bf16 / fp16 / fp8 through TransformerEngine or torchao), fallback, fp8 coverage.

The trainer calls, in this order::

    plan = plan_precision(cfg.precision, device_type)            # before Accelerator() is built
    accelerator = Accelerator(**plan.accelerator_kwargs(), ...)
    model = prepare_model_for_precision(build_model(...), plan, cfg.precision)   # before the optimizer
    model, optimizer = accelerator.prepare(model, optimizer)
    coverage = fp8_coverage(model, cfg.model, cfg.precision, seq_len=cfg.optim.seq_len)

How each fp8 backend is driven, and why:

* ``fp8-ao`` (torchao ``Float8Linear`` on an fp8 GPU): fully Accelerate's path, ``mixed_precision="fp8"`` with
  ``AORecipeKwargs(config=..., module_filter_func=...)``; ``accelerator.prepare`` converts the model. We always pass
  the recipe handler because with none Accelerate silently prefers torchao over TE, and because its default filter
  (skip the first and last ``nn.Linear``) would leave GPT-2's first attention block in bf16 and ignores our
  ``--fp8_min_dim`` / ``--fp8_lm_head`` policy.
* ``fp8-te`` (TransformerEngine): Accelerate's own ``convert_model`` and ``apply_fp8_autowrap`` with a
  ``TERecipeKwargs`` recipe, applied here per selected layer, while the Accelerator runs bf16 autocast. We do not
  hand TE to ``Accelerator(mixed_precision="fp8")``: its ``_prepare_te`` converts *every* ``nn.Linear``, including
  ``lm_head``, into a ``te.Linear`` with a *copy* of the tied embedding weight that the optimizer never sees, so the
  output layer would silently stop training.
* ``fp8-ao-emulated`` (``--fp8_emulate``): torchao with ``Float8LinearConfig(emulate=True)``, converted here with
  Accelerate's ``convert_model_to_fp8_ao``. On CPU the Accelerator runs fp32 ("no"): Accelerate's fp8 mode would
  force bf16 autocast, which CPUs without native bf16 run about 30x slower.

Coverage is measured on the actual module types after ``prepare`` (see ``fp8_coverage``).

With ``torch.compile``, TE blocks are not compiled (``PrecisionPlan.compile_blocks`` says why); torchao's
``Float8Linear`` is built for torch.compile, so fp8-ao blocks are compiled like bf16 ones.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from hf_gpt2_train.config import ConfigError, ModelConfig, PrecisionConfig
from hf_gpt2_train.model import matmul_flops_by_layer

logger = logging.getLogger(__name__)

PRECISIONS = ("no", "fp16", "bf16", "fp8")
EFFECTIVE_PRECISIONS = ("no", "fp16", "bf16", "fp8-te", "fp8-ao", "fp8-ao-emulated")
_FP8_GPUS = "compute capability 8.9+: H100, H200, L4, L40S, RTX 4090"


# ------------------------------------------------------------------------------------------------ plan
@dataclass
class PrecisionPlan:
    """What the user asked for, what will run, and how the Accelerator must be built for it."""

    requested: str
    """'no', 'fp16', 'bf16' or 'fp8' (from --mixed_precision, else the accelerate config, else default_precision)."""
    effective: str
    """What runs: one of EFFECTIVE_PRECISIONS ('no' is fp32)."""
    accelerator_mixed_precision: str
    """Value for Accelerator(mixed_precision=...)."""
    kwargs_handlers: list[Any] = field(default_factory=list)
    """For Accelerator(kwargs_handlers=...): AORecipeKwargs on the fp8-ao path, else empty."""
    warnings: list[str] = field(default_factory=list)
    """Fallbacks and ignored options, one line each: the trainer logs them at start."""
    source: str = "--mixed_precision"
    """Who chose ``requested``: '--mixed_precision', 'accelerate config' or 'default' (see default_precision)."""
    device_type: str = "cpu"
    """Device the plan was made for ('cpu', 'cuda', ...)."""
    te_recipe: Any = None
    """TERecipeKwargs for the fp8-te path (applied by prepare_model_for_precision)."""
    lm_head: bool = False
    """Policy: run lm_head in fp8 (PrecisionConfig.fp8_lm_head, forced off for TE)."""
    min_dim: int = 512
    """Policy: Linear layers with min(in, out) below this stay in high precision."""

    @property
    def is_fp8(self) -> bool:
        return self.effective.startswith("fp8")

    @property
    def fp8_backend(self) -> str | None:
        """'te', 'ao' or None."""
        if self.effective == "fp8-te":
            return "te"
        return "ao" if self.is_fp8 else None

    @property
    def compile_blocks(self) -> bool:
        """Whether ``torch.compile`` may compile the transformer blocks (``model.setup_training_forward``).

        Not with TransformerEngine: TE's fp8 state (amax histories, scales) is updated in Python around each
        ``te.Linear``; TE >= 2.x refuses its ``DelayedScaling`` recipe (the one Accelerate's ``TERecipeKwargs``
        builds) under torch.compile ("DelayedScaling is not supported under torch.compile yet",
        NVIDIA/TransformerEngine#2759) and older TE graph-breaks at every ``te.Linear``. So TE blocks run eagerly
        (TE's own fused kernels do the work there) and only the lm_head + loss region, which holds no TE module
        (lm_head stays bf16 under TE), is compiled.
        """
        return self.effective != "fp8-te"

    @property
    def fell_back(self) -> bool:
        """The requested precision could not run (the warning says why)."""
        if self.requested == "fp8":
            return not self.is_fp8
        return self.effective != self.requested

    def accelerator_kwargs(self) -> dict[str, Any]:
        """``Accelerator(**plan.accelerator_kwargs(), ...)``."""
        return {"mixed_precision": self.accelerator_mixed_precision, "kwargs_handlers": list(self.kwargs_handlers)}

    def to_dict(self) -> dict[str, Any]:
        """Fields for run_info.json / the checkpoint manifest."""
        return {
            "requested_precision": self.requested,
            "effective_precision": self.effective,
            "fp8_backend": self.fp8_backend,
            "precision_warnings": list(self.warnings),
            "precision_source": self.source,
        }


def detect_device_type() -> str:
    """The device Accelerate will pick, without building an Accelerator (ACCELERATE_USE_CPU wins)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes", "on"):
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def torchao_float8_available() -> bool:
    """torchao.float8 imports (and Accelerate agrees it is usable)."""
    from accelerate.utils import is_torchao_available

    if not is_torchao_available():
        return False
    try:
        _quiet_import_torchao()
    except ImportError:
        return False
    return True


def transformer_engine_available() -> bool:
    """transformer_engine.pytorch imports (it needs a CUDA build)."""
    from accelerate.utils import is_transformer_engine_available

    if not is_transformer_engine_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a CUDA-less machine raises OSError/RuntimeError from TE's library loader
        return False
    return True


def _quiet_import_torchao() -> Any:
    """Import torchao.float8. Without CUDA, torchao logs a warning per CUDA kernel library it cannot load (mxfp8,
    cutlass) and torch logs a deprecation about torchao's Enum registration: neither matters for float8 training,
    so they are muted on CPU-only machines instead of alarming every user at start."""
    names = ("torchao", "torch.utils._pytree")
    saved = [logging.getLogger(n).level for n in names]
    if not torch.cuda.is_available():
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
    try:
        import torchao.float8 as f8
    finally:
        for n, lvl in zip(names, saved, strict=True):
            logging.getLogger(n).setLevel(lvl)
    return f8


def default_precision(device_type: str) -> str:
    """The precision of a run that names none (no --mixed_precision, no accelerate config): bf16 autocast on a
    CUDA GPU that has bf16 (what build-nanogpt and litgpt train GPT-2 in; fp32 there is several times slower),
    fp32 everywhere else (CPUs without bf16 instructions run it ~30x slower; fp16 needs loss scaling)."""
    return "bf16" if device_type == "cuda" and _cuda_bf16_capable() else "no"


def _cuda_bf16_capable() -> bool:
    return torch.cuda.is_bf16_supported(including_emulation=False)


def _cuda_fp8_capable() -> bool:
    major, minor = torch.cuda.get_device_capability()
    return (major, minor) >= (8, 9)


def _fallback_precision(device_type: str) -> str:
    if device_type == "cpu":
        return "no"
    from accelerate.utils import is_bf16_available

    return "bf16" if is_bf16_available(True) else "fp16"


def _fsdp_enabled() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def plan_precision(cfg: PrecisionConfig, device_type: str | None = None) -> PrecisionPlan:
    """Decide what runs, before the Accelerator exists. Never raises for a missing backend: it falls back.

    ``cfg.mixed_precision`` None means the accelerate config's choice (``ACCELERATE_MIXED_PRECISION``, set by
    ``accelerate launch``), else ``default_precision`` (bf16 on a CUDA GPU that has it, fp32 elsewhere).
    ``fp8_backend='auto'`` follows the accelerate config's ``fp8_config.backend`` (``ACCELERATE_FP8_BACKEND``)
    when it names TE or AO, else TE if usable, else torchao.

    Side effect: ``ACCELERATE_FP8_BACKEND`` is removed from ``os.environ``. The plan owns the backend from here on;
    Accelerate's ``prepare()`` reads that variable whenever no recipe handler is passed, even for a bf16 run, and
    would convert the whole model with it (or crash when that backend is the missing one we fell back from).
    Raises ConfigError only for contradictory input (unknown precision, --fp8_emulate with --fp8_backend te).
    """
    device_type = device_type or detect_device_type()
    if cfg.mixed_precision:
        requested, source = cfg.mixed_precision.lower(), "--mixed_precision"
    elif os.environ.get("ACCELERATE_MIXED_PRECISION"):
        requested, source = os.environ["ACCELERATE_MIXED_PRECISION"].lower(), "accelerate config"
    else:
        requested, source = default_precision(device_type), "default"
    if requested not in PRECISIONS:
        raise ConfigError(f"mixed_precision {requested!r} is not one of {'/'.join(PRECISIONS)}: "
                          "fix --mixed_precision or the accelerate config")
    if cfg.fp8_backend not in ("auto", "te", "ao"):
        raise ConfigError(f"fp8_backend must be auto/te/ao, not {cfg.fp8_backend!r}")
    env_backend = os.environ.pop("ACCELERATE_FP8_BACKEND", "").lower()
    backend = cfg.fp8_backend
    if backend == "auto" and env_backend in ("te", "ao"):
        backend = env_backend  # the accelerate config (fp8_config.backend) named it
    warns: list[str] = []
    if env_backend == "msamp" and requested == "fp8":
        warns.append("the accelerate config asks for the MS-AMP fp8 backend, which this trainer does not "
                      "support: choosing between TE and torchao instead (--fp8_backend te|ao)")

    def plan(effective: str, mp: str, **kw: Any) -> PrecisionPlan:
        return PrecisionPlan(requested=requested, effective=effective, accelerator_mixed_precision=mp,
                             warnings=warns, source=source, device_type=device_type, lm_head=cfg.fp8_lm_head,
                             min_dim=cfg.fp8_min_dim, **kw)

    if requested != "fp8":
        if cfg.fp8_emulate:
            warns.append("--fp8_emulate has no effect unless --mixed_precision fp8")
        if requested == "fp16" and device_type == "cpu":
            warns.append("fp16 mixed precision needs a GPU; training in fp32 on cpu (use --mixed_precision bf16 "
                         "or no)")
            return plan("no", "no")
        return plan(requested, requested)

    fallback = _fallback_precision(device_type)
    fallback_name = "fp32" if fallback == "no" else fallback

    def fall_back(why: str, fix: str) -> PrecisionPlan:
        warns.append(f"fp8 requested but {why}: training in {fallback_name} instead ({fix})")
        return plan(fallback, fallback)

    if cfg.fp8_emulate:
        if cfg.fp8_backend == "te":
            raise ConfigError("--fp8_emulate runs torchao's emulated fp8; TransformerEngine cannot emulate: "
                              "use --fp8_backend ao or auto with --fp8_emulate")
        if not torchao_float8_available():
            return fall_back("torchao is not importable, and --fp8_emulate needs it", "pip install torchao")
        if backend == "te":  # named by the accelerate config, not by a flag (that case raised above)
            warns.append("the accelerate config names the TE fp8 backend, which cannot emulate: --fp8_emulate "
                         "runs torchao's emulated fp8 instead")
        # Emulation does fp8 casts in software; the rest of the model runs as a real fp8 run would (bf16 autocast)
        # except on CPU, where bf16 autocast is far slower than fp32 and gains nothing.
        return plan("fp8-ao-emulated", "no" if device_type == "cpu" else "bf16")

    if device_type != "cuda":
        return fall_back(f"this run is on {device_type}, not an fp8-capable GPU ({_FP8_GPUS})",
                         "--fp8_emulate runs torchao's emulated fp8 anywhere, slowly, for tests")
    if not _cuda_fp8_capable():
        cap = ".".join(map(str, torch.cuda.get_device_capability()))
        return fall_back(f"{torch.cuda.get_device_name()} has compute capability {cap}, not an fp8 GPU "
                         f"({_FP8_GPUS})", "use --mixed_precision bf16 to silence this")
    te_ok = backend in ("te", "auto") and transformer_engine_available()
    ao_ok = backend in ("ao", "auto") and not te_ok and torchao_float8_available()
    if te_ok:
        from accelerate.utils import TERecipeKwargs

        if cfg.fp8_lm_head:
            warns.append("--fp8_lm_head is ignored with TransformerEngine: te.Linear cannot share the tied "
                         "embedding weight, so lm_head stays in bf16 (use --fp8_backend ao for an fp8 lm_head)")
        # TERecipeKwargs reads ACCELERATE_FP8_FORMAT/AMAX_*/MARGIN/INTERVAL: the accelerate config's fp8_config.
        p = plan("fp8-te", "bf16", te_recipe=TERecipeKwargs())
        p.lm_head = False
        return p
    if ao_ok:
        return plan("fp8-ao", "fp8", kwargs_handlers=[ao_recipe(cfg)])
    if backend == "te":
        return fall_back("TransformerEngine is not importable", "pip install 'hf-gpt2-train[fp8]', or --fp8_backend ao")
    if backend == "ao":
        return fall_back("torchao is not importable", "pip install torchao, or --fp8_backend te")
    return fall_back("neither TransformerEngine nor torchao is importable",
                     "pip install torchao, or 'hf-gpt2-train[fp8]' for TransformerEngine")


def ao_recipe(cfg: PrecisionConfig) -> Any:
    """The ``AORecipeKwargs`` for Accelerate's torchao path: dynamic tensorwise scaling (torchao's default recipe)
    and our layer policy as the module filter. FSDP float8 all-gather only under FSDP: elsewhere torchao would wrap
    each weight in a new Parameter that the already-built optimizer does not hold."""
    from accelerate.utils import AORecipeKwargs

    f8 = _quiet_import_torchao()
    config = f8.Float8LinearConfig(enable_fsdp_float8_all_gather=_fsdp_enabled())
    return AORecipeKwargs(config=config, module_filter_func=partial(
        fp8_module_filter, lm_head=cfg.fp8_lm_head, min_dim=cfg.fp8_min_dim))


# ------------------------------------------------------------------------------------------ layer policy
def _clean_name(fqn: str) -> str:
    """Strip wrapper prefixes (torch.compile's _orig_mod., DDP's module.) so names match the bare model's."""
    changed = True
    while changed:
        changed = False
        for prefix in ("_orig_mod.", "module."):
            if fqn.startswith(prefix):
                fqn, changed = fqn[len(prefix):], True
    return fqn


def fp8_skip_reason(module: nn.Module, fqn: str, lm_head: bool, min_dim: int) -> str | None:
    """Why this module stays in high precision, or None when it runs in fp8."""
    if not isinstance(module, nn.Linear):
        return "not an nn.Linear"
    if _clean_name(fqn) == "lm_head" and not lm_head:
        return "lm_head kept in high precision (--fp8_lm_head converts it)"
    if module.in_features % 16 or module.out_features % 16:
        return "dims not divisible by 16 (fp8 GEMM requirement)"
    if min(module.in_features, module.out_features) < min_dim:
        return f"smaller than --fp8_min_dim {min_dim}"
    return None


def fp8_module_filter(module: nn.Module, fqn: str, lm_head: bool = False, min_dim: int = 512) -> bool:
    """torchao/Accelerate ``module_filter_func``: True converts the layer to fp8."""
    return fp8_skip_reason(module, fqn, lm_head, min_dim) is None


# ------------------------------------------------------------------------------------------- conversion
def prepare_model_for_precision(model: nn.Module, plan: PrecisionPlan, cfg: PrecisionConfig) -> nn.Module:
    """Convert the model for paths Accelerate does not drive (fp8-ao-emulated, fp8-te); a no-op otherwise.

    Call after build_model and BEFORE creating the optimizer (TE conversion creates new parameters) and before
    ``accelerator.prepare``. Parameter names and the tied embedding are preserved on the torchao paths, so
    checkpoints load across precisions.
    """
    if plan.effective == "fp8-ao-emulated":
        from accelerate.utils.ao import convert_model_to_fp8_ao

        f8 = _quiet_import_torchao()
        convert_model_to_fp8_ao(
            model,
            config=f8.Float8LinearConfig(emulate=True),
            module_filter_func=partial(fp8_module_filter, lm_head=plan.lm_head, min_dim=plan.min_dim),
        )
    elif plan.effective == "fp8-te":
        _convert_te(model, plan)
    return model


def _convert_te(model: nn.Module, plan: PrecisionPlan) -> None:
    """TE conversion of the selected Linear layers with Accelerate's ``convert_model``, then its fp8 autocast."""
    from accelerate.utils import apply_fp8_autowrap
    from accelerate.utils.transformer_engine import convert_model

    for fqn, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not fp8_module_filter(module, fqn, plan.lm_head, plan.min_dim):
            continue
        parent_name, _, attr = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        # convert_model converts every Linear child of what it is given; a one-child holder limits it to this
        # layer, and _convert_ln=False keeps nn.LayerNorm (Accelerate notes te.LayerNorm gains nothing).
        holder = nn.ModuleDict({"layer": module})
        with torch.no_grad():
            convert_model(holder, _convert_ln=False)
        setattr(parent, attr, holder["layer"])
    apply_fp8_autowrap(model, plan.te_recipe)


# --------------------------------------------------------------------------------------------- coverage
def _fp8_module_types() -> tuple[type, ...]:
    """fp8 module classes of the backends already imported: a model cannot hold a class whose module was never
    imported, so an fp32/bf16 run does not pay torchao's or TE's import here."""
    types: list[type] = []
    ao = sys.modules.get("torchao.float8.float8_linear")
    if ao is not None:
        types.append(ao.Float8Linear)
    te = sys.modules.get("transformer_engine.pytorch")
    if te is not None:
        types.append(te.Linear)
    return tuple(types)


def _backend_of(module: nn.Module) -> str:
    return "te" if type(module).__module__.startswith("transformer_engine") else "ao"


def fp8_coverage(model: nn.Module, model_cfg: ModelConfig, cfg: PrecisionConfig | PrecisionPlan | None = None,
                 seq_len: int | None = None) -> dict[str, Any]:
    """fp8 coverage of a (prepared) model, from the module types actually in it.

    ``fp8_coverage``: fraction of forward weight-matmul FLOPs per token (the 4 block projections of every layer
    plus lm_head, ``model.matmul_flops_by_layer``) done by fp8 modules (torchao Float8Linear / te.Linear).
    ``fp8_block_coverage``: the same over the block projections only (lm_head excluded).
    ``fp8_coverage_with_attention`` (when seq_len is given): the denominator also counts the attention-score
    matmuls QK^T and AV (4 * n_embd * seq_len FLOPs per token per layer, as in ``flops_per_token``); they run in
    SDPA, never in fp8. Layer norms, softmax and the embedding lookup are not matmuls and are not counted.
    ``bf16_layers``: weight-matmul layers left in high precision (bf16, or fp32 in an fp32 run), and
    ``skipped`` groups them by reason (given the policy from ``cfg``).
    """
    flops = matmul_flops_by_layer(model_cfg)
    fp8_types = _fp8_module_types()
    found: dict[str, nn.Module] = {}
    for fqn, module in model.named_modules():
        name = _clean_name(fqn)
        if name in flops and name not in found:
            found[name] = module
    missing = sorted(set(flops) - set(found))
    if missing:
        raise ValueError(f"model does not match model_cfg: no module for {missing[:3]}")
    fp8_names = [n for n, m in found.items() if fp8_types and isinstance(m, fp8_types)]
    total = sum(flops.values())
    block_total = total - flops["lm_head"]
    fp8_flops = sum(flops[n] for n in fp8_names)
    fp8_block = sum(flops[n] for n in fp8_names if n != "lm_head")
    backends = sorted({_backend_of(found[n]) for n in fp8_names})
    out: dict[str, Any] = {
        "fp8_coverage": fp8_flops / total,
        "fp8_block_coverage": fp8_block / block_total if block_total else 0.0,
        "fp8_layers": len(fp8_names),
        "fp8_backend": ",".join(backends) if backends else None,
        "bf16_layers": [n for n in found if n not in fp8_names],
    }
    if seq_len:
        attn = 4.0 * model_cfg.n_embd * seq_len * model_cfg.n_layer
        out["fp8_coverage_with_attention"] = fp8_flops / (total + attn)
    if cfg is not None:
        lm_head, min_dim = (cfg.lm_head, cfg.min_dim) if isinstance(cfg, PrecisionPlan) else (
            cfg.fp8_lm_head, cfg.fp8_min_dim)
        skipped: dict[str, list[str]] = {}
        for n in out["bf16_layers"]:
            reason = fp8_skip_reason(found[n], n, lm_head, min_dim) or "fp8 not active in this run"
            skipped.setdefault(reason, []).append(n)
        out["skipped"] = skipped
    return out


def precision_id(precision: str | None) -> str | None:
    """A precision as run_info/manifests store it: Accelerate's 'no' is named 'fp32'; everything else as is."""
    return "fp32" if precision == "no" else precision


def precision_name(effective: str | None, coverage: float | None = None) -> str:
    """What runs, for people: 'fp32', 'fp16', 'bf16', 'fp8 (te, coverage 89%)', 'fp8 (ao emulated, coverage 42%)'.

    ``effective`` is a PrecisionPlan.effective (or the run_info/manifest id); ``coverage`` the fraction of
    weight-matmul FLOPs in fp8 (``fp8_coverage``). Also reads names written by older runs ('no').
    """
    eff = precision_id(effective) or "unknown"
    if not eff.startswith("fp8"):
        return eff
    backend = {"fp8-te": "te", "fp8-ao": "ao", "fp8-ao-emulated": "ao emulated"}.get(eff, eff.removeprefix("fp8-"))
    cov = f", coverage {coverage:.0%}" if coverage is not None else ""
    return f"fp8 ({backend}{cov})"


def describe(plan: PrecisionPlan, coverage: dict[str, Any] | None = None) -> str:
    """One start-of-run log line: requested vs effective precision and fp8 coverage."""
    cov = (coverage or {}).get("fp8_coverage") if plan.is_fp8 else None
    s = f"precision: {precision_name(plan.effective, cov)}"
    if plan.requested != plan.effective and not (plan.requested == "fp8" and plan.is_fp8):
        s += f" (requested {precision_id(plan.requested)})"
    elif plan.source == "default":
        s += " (the default on this device; --mixed_precision no|bf16|fp8 to choose)"
    if plan.is_fp8 and coverage is not None:
        s += (f"; fp8 runs {coverage['fp8_coverage']:.1%} of weight-matmul FLOPs "
              f"({coverage['fp8_block_coverage']:.1%} of block matmuls, {coverage['fp8_layers']} layers)")
        if coverage["fp8_layers"] == 0:
            s += f"; no layer qualified (--fp8_min_dim {plan.min_dim}?)"
    return s


def precision_info(plan: PrecisionPlan, coverage: dict[str, Any] | None = None) -> dict[str, Any]:
    """run_info.json fields: requested/effective precision ('fp32' for Accelerate's 'no'), ``precision`` (the
    name people read, see precision_name), backend, coverage and warnings."""
    info = plan.to_dict()
    info["requested_precision"] = precision_id(plan.requested)
    info["effective_precision"] = precision_id(plan.effective)
    cov = coverage or {}
    info["fp8_coverage"] = cov.get("fp8_coverage", 0.0) if plan.is_fp8 else 0.0
    info["precision"] = precision_name(plan.effective, info["fp8_coverage"] if plan.is_fp8 else None)
    info["fp8_block_coverage"] = cov.get("fp8_block_coverage", 0.0) if plan.is_fp8 else 0.0
    info["fp8_layers"] = cov.get("fp8_layers", 0) if plan.is_fp8 else 0
    if plan.is_fp8 and "skipped" in cov:
        info["fp8_skipped"] = cov["skipped"]
    return info
