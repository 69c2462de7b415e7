"""fp8 on CPU through torchao emulation: real conversion of GPT-2's block matmuls, coverage, lm_head policy,
training on real text, fallback when fp8 cannot run (including a truly missing torchao), checkpoints that load
across precisions through Accelerate's own save_state/load_state, and a graph without breaks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from hf_gpt2_train.config import ConfigError, ModelConfig, PrecisionConfig
from hf_gpt2_train.data.tokenizer import get_encoding
from hf_gpt2_train.model import BLOCK_PROJECTIONS, build_model, lm_logits, lm_loss
from hf_gpt2_train.precision import (
    ao_recipe,
    describe,
    fp8_coverage,
    plan_precision,
    precision_info,
    prepare_model_for_precision,
    transformer_engine_available,
)

torchao_float8 = pytest.importorskip("torchao.float8", reason="torchao is a dev dependency (pip install torchao)")
Float8Linear = torchao_float8.float8_linear.Float8Linear

# A GPT-2 with a 2,048-token vocabulary: the full 50,304-row lm_head would dominate every step on 2 CPU cores.
TINY = ModelConfig(n_layer=2, n_head=4, n_embd=128, n_positions=64, vocab_size=2048)
EMULATED = PrecisionConfig(mixed_precision="fp8", fp8_emulate=True, fp8_min_dim=16)


@pytest.fixture(scope="module")
def tokens(shared_data) -> torch.Tensor:
    """Real GPT-2 tokens of Shakespeare, the 2,047 most frequent kept and the rest mapped to one 'other' id."""
    text = (shared_data / "tinyshakespeare.txt").read_text()[:60_000]
    ids = torch.tensor(get_encoding().encode_ordinary(text), dtype=torch.long)
    uniq, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    rank = torch.empty_like(counts)
    rank[torch.argsort(counts, descending=True)] = torch.arange(len(counts))
    return rank.clamp(max=TINY.vocab_size - 1)[inverse]


@pytest.fixture
def fresh_accelerate():
    """Each test builds its own Accelerator: drop the process-wide state another test may have left."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def batches(tokens: torch.Tensor, batch: int, seq: int, n: int):
    for i in range(n):
        start = (i * batch * seq) % (len(tokens) - batch * seq - 1)
        chunk = tokens[start:start + batch * seq + 1]
        yield chunk[:-1].view(batch, seq), chunk[1:].view(batch, seq)


def emulated_model(cfg: PrecisionConfig = EMULATED, mcfg: ModelConfig = TINY) -> nn.Module:
    plan = plan_precision(cfg, "cpu")
    return prepare_model_for_precision(build_model(mcfg, seed=0), plan, cfg)


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=3e-3, betas=(0.9, 0.95))


def train_steps(model, opt, tokens, n, batch=8, seq=32, start=0) -> list[float]:
    losses = []
    for x, y in list(batches(tokens, batch, seq, start + n))[start:]:
        loss = lm_loss(lm_logits(model, x, TINY.vocab_size), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# ------------------------------------------------------------------------------------------ conversion
def test_emulated_fp8_converts_every_block_matmul_and_keeps_lm_head_tied():
    plan = plan_precision(EMULATED, "cpu")
    assert (plan.requested, plan.effective, plan.accelerator_mixed_precision) == ("fp8", "fp8-ao-emulated", "no")
    assert plan.warnings == [] and plan.fp8_backend == "ao"
    model = prepare_model_for_precision(build_model(TINY, seed=0), plan, EMULATED)
    for block in model.transformer.h:
        for name in BLOCK_PROJECTIONS:
            assert isinstance(block.get_submodule(name), Float8Linear), name
    assert type(model.lm_head) is nn.Linear  # default policy: lm_head stays high precision
    assert model.lm_head.weight is model.transformer.wte.weight

    cov = fp8_coverage(model, TINY, EMULATED, seq_len=64)
    assert cov["fp8_block_coverage"] >= 0.9
    assert cov["fp8_layers"] == 4 * TINY.n_layer and cov["fp8_backend"] == "ao"
    assert cov["bf16_layers"] == ["lm_head"]
    assert list(cov["skipped"]) == ["lm_head kept in high precision (--fp8_lm_head converts it)"]
    # Hand count: per layer 2*d*(3d + d + 4d + 4d) = 24 d^2 FLOPs in the blocks, lm_head 2*d*V.
    d, L, V = 128, 2, TINY.padded_vocab_size
    assert cov["fp8_coverage"] == pytest.approx(24 * d * d * L / (24 * d * d * L + 2 * d * V))
    assert cov["fp8_coverage_with_attention"] < cov["fp8_coverage"]
    line = describe(plan, cov)
    assert "emulated" in line and f"{cov['fp8_coverage']:.1%}" in line


def test_fp8_lm_head_option_converts_lm_head_and_keeps_the_tie():
    cfg = PrecisionConfig(mixed_precision="fp8", fp8_emulate=True, fp8_min_dim=16, fp8_lm_head=True)
    model = emulated_model(cfg)
    assert isinstance(model.lm_head, Float8Linear)
    assert model.lm_head.weight is model.transformer.wte.weight  # one parameter: the optimizer trains both uses
    cov = fp8_coverage(model, TINY, cfg)
    assert cov["fp8_coverage"] == 1.0 and cov["bf16_layers"] == [] and cov["skipped"] == {}


def test_default_min_dim_leaves_a_small_model_unconverted_and_says_why():
    cfg = PrecisionConfig(mixed_precision="fp8", fp8_emulate=True)  # fp8_min_dim 512 > n_embd 128
    plan = plan_precision(cfg, "cpu")
    model = prepare_model_for_precision(build_model(TINY, seed=0), plan, cfg)
    assert not any(isinstance(m, Float8Linear) for m in model.modules())
    cov = fp8_coverage(model, TINY, plan)
    assert cov["fp8_coverage"] == 0.0 and cov["fp8_layers"] == 0
    assert len(cov["skipped"]["smaller than --fp8_min_dim 512"]) == 4 * TINY.n_layer
    assert "--fp8_min_dim 512" in describe(plan, cov)


def test_dims_not_divisible_by_16_are_skipped_and_reported():
    odd = ModelConfig(n_layer=1, n_head=4, n_embd=72, n_positions=64, vocab_size=2048)  # 72, 216: not 16k
    cfg = PrecisionConfig(mixed_precision="fp8", fp8_emulate=True, fp8_min_dim=16, fp8_lm_head=True)
    model = emulated_model(cfg, odd)
    cov = fp8_coverage(model, odd, cfg)
    assert cov["fp8_layers"] == 0
    assert sorted(cov["skipped"]["dims not divisible by 16 (fp8 GEMM requirement)"]) == sorted(cov["bf16_layers"])
    x = torch.randint(0, odd.vocab_size, (2, 16))
    lm_loss(lm_logits(model, x[:, :-1], odd.vocab_size), x[:, 1:]).backward()  # still trains, in high precision


def test_accelerates_own_torchao_path_converts_by_our_policy(fresh_accelerate):
    """The GPU fp8-ao path: Accelerate's prepare() does the conversion, with our filter instead of its default
    (which would skip the first block's c_attn). Conversion only: real fp8 GEMMs need an fp8 GPU."""
    accelerator = Accelerator(mixed_precision="fp8", kwargs_handlers=[ao_recipe(EMULATED)], cpu=True)
    assert accelerator.fp8_backend == "AO"
    model = build_model(TINY, seed=0)
    params = list(model.parameters())
    model = accelerator.unwrap_model(accelerator.prepare(model))
    assert isinstance(model.transformer.h[0].attn.c_attn, Float8Linear)
    assert not isinstance(model.lm_head, Float8Linear) and model.lm_head.weight is model.transformer.wte.weight
    after = list(model.parameters())  # the same Parameter objects: an optimizer built before stays valid
    assert len(after) == len(params) and all(a is b for a, b in zip(after, params, strict=True))
    cov = fp8_coverage(model, TINY, EMULATED)
    assert cov["fp8_block_coverage"] == 1.0 and cov["bf16_layers"] == ["lm_head"]


# ------------------------------------------------------------------------------------------ training
def test_emulated_fp8_trains_on_real_text_through_accelerate_like_fp32(tokens, fresh_accelerate):
    plan = plan_precision(EMULATED, "cpu")
    accelerator = Accelerator(**plan.accelerator_kwargs(), cpu=True)
    fp8 = prepare_model_for_precision(build_model(TINY, seed=0), plan, EMULATED)
    fp32 = build_model(TINY, seed=0)
    fp8, fp8_opt, fp32, fp32_opt = accelerator.prepare(fp8, adamw(fp8), fp32, adamw(fp32))
    cov = fp8_coverage(fp8, TINY, plan)
    assert cov["fp8_block_coverage"] >= 0.9  # still converted after prepare, and not re-converted
    fp8_losses = train_steps(fp8, fp8_opt, tokens, 20)
    fp32_losses = train_steps(fp32, fp32_opt, tokens, 20)
    assert fp8_losses != fp32_losses  # the fp8 casts really happen
    first, fp8_last, fp32_last = fp8_losses[0], sum(fp8_losses[-5:]) / 5, sum(fp32_losses[-5:]) / 5
    assert first > 7.0  # ~ln(2048) = 7.6 at init
    assert fp8_last < first - 1.0, fp8_losses
    assert abs(fp8_last - fp32_last) < 0.25, (fp8_losses, fp32_losses)


# ------------------------------------------------------------------------------------------ fallback
def test_fp8_on_cpu_without_emulation_falls_back_to_fp32_with_one_warning():
    plan = plan_precision(PrecisionConfig(mixed_precision="fp8"), "cpu")
    assert (plan.requested, plan.effective, plan.accelerator_mixed_precision) == ("fp8", "no", "no")
    assert plan.fell_back and plan.kwargs_handlers == [] and len(plan.warnings) == 1
    assert "fp32" in plan.warnings[0] and "--fp8_emulate" in plan.warnings[0]
    info = precision_info(plan, None)
    assert info["requested_precision"] == "fp8" and info["effective_precision"] == "fp32"
    assert info["fp8_backend"] is None and info["fp8_coverage"] == 0.0
    assert "(requested fp8)" in describe(plan)


def test_precision_comes_from_the_accelerate_config_and_its_backend_variable_is_consumed(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    monkeypatch.setenv("ACCELERATE_FP8_BACKEND", "TE")
    plan = plan_precision(PrecisionConfig(fp8_emulate=True, fp8_min_dim=16), "cpu")
    assert plan.requested == "fp8" and plan.effective == "fp8-ao-emulated"
    # Left in place, Accelerate's prepare() would run TE conversion even for this non-fp8 Accelerator.
    assert "ACCELERATE_FP8_BACKEND" not in os.environ
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert plan_precision(PrecisionConfig(), "cpu").effective == "bf16"
    assert plan_precision(PrecisionConfig(mixed_precision="no"), "cpu").effective == "no"  # the flag wins


def test_a_run_that_names_no_precision_trains_in_bf16_on_a_gpu_with_bf16_and_fp32_elsewhere(monkeypatch):
    """No --mixed_precision and no accelerate config: bf16 on a CUDA GPU that has it, fp32 on CPU and older GPUs.
    A GPU cannot exist here: its bf16 capability is the one thing stood in for."""
    import hf_gpt2_train.precision as precision

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    cpu = plan_precision(PrecisionConfig(), "cpu")
    assert (cpu.requested, cpu.effective, cpu.source) == ("no", "no", "default") and cpu.warnings == []
    assert "the default on this device" in describe(cpu)
    assert precision_info(cpu)["precision_source"] == "default"
    for has_bf16, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(precision, "_cuda_bf16_capable", lambda has_bf16=has_bf16: has_bf16)
        gpu = plan_precision(PrecisionConfig(), "cuda")
        assert (gpu.requested, gpu.effective, gpu.accelerator_mixed_precision) == (expected, expected, expected)
        assert gpu.source == "default" and gpu.warnings == []
    monkeypatch.setattr(precision, "_cuda_bf16_capable", lambda: True)
    flag = plan_precision(PrecisionConfig(mixed_precision="no"), "cuda")  # a named precision is kept
    assert (flag.effective, flag.source) == ("no", "--mixed_precision")
    assert "default" not in describe(flag)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # so is an accelerate config's
    configured = plan_precision(PrecisionConfig(), "cuda")
    assert (configured.effective, configured.source) == ("no", "accelerate config")


def test_contradictory_precision_input_is_a_config_error(monkeypatch):
    with pytest.raises(ConfigError, match="--fp8_backend ao"):
        plan_precision(PrecisionConfig(mixed_precision="fp8", fp8_emulate=True, fp8_backend="te"), "cpu")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp4")
    with pytest.raises(ConfigError, match="accelerate config"):
        plan_precision(PrecisionConfig(), "cpu")


def test_fp16_on_cpu_falls_back_to_fp32():
    plan = plan_precision(PrecisionConfig(mixed_precision="fp16"), "cpu")
    assert plan.effective == "no" and plan.fell_back and "GPU" in plan.warnings[0]


def test_missing_torchao_falls_back_and_the_plan_still_builds_an_accelerator(tmp_path):
    # A real missing import: None in sys.modules makes `import torchao` fail and find_spec report it absent,
    # exactly as if the package were not installed.
    code = textwrap.dedent("""
        import json, sys
        sys.modules["torchao"] = None
        import torch
        from accelerate import Accelerator
        from hf_gpt2_train.config import ModelConfig, PrecisionConfig
        from hf_gpt2_train.model import build_model
        from hf_gpt2_train.precision import fp8_coverage, plan_precision, precision_info, prepare_model_for_precision
        cfg = PrecisionConfig(mixed_precision="fp8", fp8_emulate=True, fp8_min_dim=16)
        plan = plan_precision(cfg, "cpu")
        acc = Accelerator(**plan.accelerator_kwargs(), cpu=True)
        mcfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=256)
        model = prepare_model_for_precision(build_model(mcfg, seed=0), plan, cfg)
        model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters()))
        x = torch.randint(0, 256, (2, 8))
        model(input_ids=x).logits.sum().backward()
        print(json.dumps({**precision_info(plan, fp8_coverage(model, mcfg, plan)), "warnings": plan.warnings}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["requested_precision"] == "fp8" and info["effective_precision"] == "fp32"
    assert info["fp8_backend"] is None and info["fp8_coverage"] == 0.0
    assert len(info["warnings"]) == 1 and "torchao is not importable" in info["warnings"][0]
    assert "pip install torchao" in info["warnings"][0]


# ------------------------------------------------------------------------------------------ checkpoints
def _save_trained(ckpt, plan_cfg: PrecisionConfig, tokens) -> tuple[dict, dict]:
    plan = plan_precision(plan_cfg, "cpu")
    acc = Accelerator(**plan.accelerator_kwargs(), cpu=True)
    model = prepare_model_for_precision(build_model(TINY, seed=0), plan, plan_cfg)
    model, opt = acc.prepare(model, adamw(model))
    train_steps(model, opt, tokens, 3)
    acc.save_state(str(ckpt), safe_serialization=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, opt.state_dict()


def _load_into(ckpt, plan_cfg: PrecisionConfig, tokens) -> tuple[nn.Module, torch.optim.Optimizer]:
    AcceleratorState._reset_state(reset_partial_state=True)
    plan = plan_precision(plan_cfg, "cpu")
    acc = Accelerator(**plan.accelerator_kwargs(), cpu=True)
    model = prepare_model_for_precision(build_model(TINY, seed=1), plan, plan_cfg)
    model, opt = acc.prepare(model, adamw(model))
    acc.load_state(str(ckpt))
    return model, opt


@pytest.mark.parametrize("saved_in,resumed_in", [("fp8", "no"), ("no", "fp8")])
def test_checkpoint_resumes_across_fp8_and_full_precision(tmp_path, tokens, fresh_accelerate, saved_in, resumed_in):
    cfgs = {"fp8": EMULATED, "no": PrecisionConfig(mixed_precision="no")}
    state, opt_state = _save_trained(tmp_path / "ckpt", cfgs[saved_in], tokens)
    model, opt = _load_into(tmp_path / "ckpt", cfgs[resumed_in], tokens)
    assert any(isinstance(m, Float8Linear) for m in model.modules()) == (resumed_in == "fp8")
    loaded = model.state_dict()
    assert list(loaded) == list(state)
    for k in state:
        assert torch.equal(loaded[k], state[k]), k
    assert model.lm_head.weight is model.transformer.wte.weight
    got = opt.state_dict()
    assert len(got["state"]) == len(opt_state["state"]) > 0
    for i, s in opt_state["state"].items():
        assert torch.equal(got["state"][i]["exp_avg"], s["exp_avg"]) and got["state"][i]["step"] == s["step"]
    losses = train_steps(model, opt, tokens, 2, start=3)  # and training continues
    assert all(torch.isfinite(torch.tensor(losses)))


# ------------------------------------------------------------------------------------------ TransformerEngine
def test_transformer_engine_converts_the_selected_layers_and_leaves_the_tied_lm_head():
    if not transformer_engine_available() or not torch.cuda.is_available():
        pytest.skip("TransformerEngine is not importable here (it needs a CUDA build and an NVIDIA GPU); the TE "
                    "path is exercised only on such machines")
    import transformer_engine.pytorch as te

    cfg = PrecisionConfig(mixed_precision="fp8", fp8_backend="te", fp8_min_dim=16)
    plan = plan_precision(cfg, "cuda")
    if plan.fell_back:
        pytest.skip(f"this GPU cannot run fp8: {plan.warnings[0]}")
    assert plan.effective == "fp8-te" and plan.accelerator_mixed_precision == "bf16" and plan.te_recipe
    model = prepare_model_for_precision(build_model(TINY, seed=0), plan, cfg).cuda()
    for block in model.transformer.h:
        for name in BLOCK_PROJECTIONS:
            assert isinstance(block.get_submodule(name), te.Linear), name
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.transformer.wte.weight
    cov = fp8_coverage(model, TINY, plan)
    assert cov["fp8_backend"] == "te" and cov["fp8_block_coverage"] == 1.0
    x = torch.randint(0, TINY.vocab_size, (4, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = lm_loss(lm_logits(model, x[:, :-1], TINY.vocab_size), x[:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and model.transformer.h[0].attn.c_attn.weight.grad is not None
