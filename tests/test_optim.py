"""The optimizer component as units (fast, CPU, no training run): Muon's parameter split and shape scaling, its
device-side skip, the schedules' values at their phase boundaries, resuming a WSD run longer, --decay_now."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hf_gpt2_train.config import ConfigError, build_config
from hf_gpt2_train.model import build_model
from hf_gpt2_train.optim import (
    MuonWithAdamW,
    build_optimizer,
    decay_start,
    lr_at,
    muon_row_blocks,
    orthogonalise,
    schedule_change,
    set_lr,
    start_decay_now,
)

CPU = torch.device("cpu")


def tiny(**over: object):
    cfg = build_config("quickstart", cli={"n_layer": 2, "n_embd": 32, "n_head": 2, "optimizer": "muon", **over})
    return cfg, build_model(cfg.model, seed=0)


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = (torch.randint(0, 50257, (2, 16), generator=g) for _ in range(2))
    (model(input_ids=x, targets=y) * scale).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_muon_trains_the_block_matrices_and_adamw_the_rest() -> None:
    cfg, model = tiny()
    opt = build_optimizer(model, cfg, CPU)
    assert isinstance(opt, MuonWithAdamW)
    name = {id(p): n for n, p in model.named_parameters()}
    groups = {(g["muon"], g["row_blocks"], g["weight_decay"]): sorted(name[id(p)] for p in g["params"])
              for g in opt.param_groups}
    assert groups[(True, 3, 0.01)] == [f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)]  # Q, K, V apart
    assert len(groups[(True, 1, 0.01)]) == 6 and all(".c_attn." not in n for n in groups[(True, 1, 0.01)])
    assert groups[(False, 1, 0.1)] == ["transformer.wpe.weight", "transformer.wte.weight"]  # wte is also lm_head
    assert all(n.endswith("bias") or ".ln_" in n for n in groups[(False, 1, 0.0)])
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))
    assert {g["lr"] for g in opt.param_groups if g["muon"]} == {0.02}
    # The AdamW default is untouched: torch's own AdamW, decay on 2-D weights only.
    adamw = build_optimizer(model, build_config("quickstart"), CPU)
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["fused"]


def test_shape_scaling_reads_the_training_layout_and_qkv_blocks() -> None:
    """c_fc is [4d, d] (out, in): its update is scaled by 2 = sqrt(4); mlp.c_proj [d, 4d] by 1; each Q/K/V block of
    c_attn [3d, d] is orthogonal on its own (scale 1), which the whole [3d, d] matrix (scale sqrt 3) is not."""
    torch.manual_seed(0)
    sv = lambda t: torch.linalg.svdvals(t)  # noqa: E731
    _, model = tiny()
    mlp = model.transformer.h[0].mlp
    assert mlp.c_fc.weight.shape == (128, 32) and mlp.c_proj.weight.shape == (32, 128)  # [out, in]
    fc = torch.randn(128, 32)
    assert torch.allclose(orthogonalise(fc), 2 * orthogonalise(fc.T).T)  # same matrix, scaled by its out/in
    s = sv(orthogonalise(fc.T))
    assert 0.6 < s.min() and s.max() < 1.25  # Newton-Schulz pushes singular values into ~[0.7, 1.2]
    qkv = torch.randn(96, 32)
    qkv[32:64] *= 100  # K's scale must not leak into Q and V
    blocks = orthogonalise(qkv, row_blocks=3).split(32)
    for b, alone in zip(blocks, qkv.split(32), strict=True):
        assert torch.allclose(b, orthogonalise(alone), atol=1e-5)
    whole = orthogonalise(qkv).split(32)  # one matrix: K takes the update, Q and V almost nothing
    assert whole[0].norm() < 0.5 * blocks[0].norm()
    from transformers.pytorch_utils import Conv1D

    with pytest.raises(ValueError, match="training layout"):
        muon_row_blocks("transformer.h.0.mlp.c_fc.weight", Conv1D(128, 32))
    assert muon_row_blocks("transformer.h.0.mlp.c_fc.bias", torch.nn.Linear(32, 128)) is None


def _state(opt: torch.optim.Optimizer) -> dict:
    return copy.deepcopy(opt.state_dict()["state"])


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].keys() == b[k].keys() and all(torch.equal(a[k][n], b[k][n])
                                                                             for n in a[k]) for k in a)


def test_a_skipped_update_leaves_weights_and_optimizer_state_untouched() -> None:
    """found_inf (the update guard's flag, a device tensor) skips Muon and AdamW alike: weights, momentum buffers,
    AdamW moments and step counts stay bit for bit, whether the gradients are finite or NaN."""
    cfg, model = tiny()
    opt = build_optimizer(model, cfg, CPU)
    opt.found_inf = torch.zeros(())
    for s in range(2):
        step(model, opt, s)
    for grads_nan in (False, True):
        weights, state = copy.deepcopy(model.state_dict()), _state(opt)
        opt.found_inf = torch.ones(())
        step(model, opt, 7, scale=math.nan if grads_nan else 1.0)
        assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
        assert _same(state, _state(opt)) and any("momentum_buffer" in v for v in state.values())
    opt.found_inf = torch.zeros(())
    step(model, opt, 7)
    after = _state(opt)
    assert not _same(state, after) and all(float(v["step"]) == 3 for v in after.values() if "step" in v)


def test_the_update_guard_skips_muon_on_the_device_as_the_trainer_applies_it() -> None:
    """The real UpdateGuard, applied as the trainer does (``applied_to`` around ``step()``), on Muon: after the
    accepted steps fill its window (16, the smallest allowed), a finite step with 10x the gradient (a grad-norm
    outlier) and a NaN step are both skipped (weights and Muon/AdamW state bit for bit), and the next normal step
    updates again."""
    from hf_gpt2_train.config import ResilienceConfig
    from hf_gpt2_train.resilience.guard import UpdateGuard

    cfg, model = tiny()
    opt = build_optimizer(model, cfg, CPU)
    guard = UpdateGuard(ResilienceConfig(outlier_window=16), "skip", CPU)

    def guarded_step(s: int, scale: float = 1.0) -> float:
        g = torch.Generator().manual_seed(s % 3)  # three batches in turn: a stable window
        x, y = (torch.randint(0, 50257, (2, 16), generator=g) for _ in range(2))
        loss = model(input_ids=x, targets=y)
        (loss * scale).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
        skip = guard.check(loss.detach() * (scale if math.isnan(scale) else 1.0), norm, s, (s, s + 1))
        with guard.applied_to(opt, skip):
            opt.step()
        opt.zero_grad(set_to_none=True)
        return float(skip)

    assert [guarded_step(s) for s in range(16)] == [0.0] * 16
    for s, scale in ((16, 10.0), (17, math.nan)):
        weights, state = copy.deepcopy(model.state_dict()), _state(opt)
        assert guarded_step(s, scale) == 1.0
        assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
        assert _same(state, _state(opt))
    assert guarded_step(18) == 0.0 and not _same(state, _state(opt))


def test_grad_scale_is_honoured_like_fused_adamw() -> None:
    """A GradScaler hands fused optimizers still-scaled gradients and the scale: same step as unscaled ones."""
    cfg, model = tiny()
    twin = copy.deepcopy(model)
    a, b = build_optimizer(model, cfg, CPU), build_optimizer(twin, cfg, CPU)
    assert a._step_supports_amp_scaling
    b.grad_scale = torch.tensor(1024.0)
    step(model, a, 3)
    step(twin, b, 3, scale=1024.0)
    for (k, v), w in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.allclose(v, w, atol=1e-6, rtol=0), k


def test_wsd_lr_at_its_phase_boundaries() -> None:
    cfg = build_config("quickstart", cli={"lr_schedule": "wsd", "max_steps": 100, "warmup_steps": 10,
                                          "decay_fraction": 0.2, "learning_rate": 1e-3, "min_lr_ratio": 0.1,
                                          "optimizer": "muon", "muon_learning_rate": 0.02})
    assert decay_start(cfg.optim) == 80
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)  # warmup
    assert lr_at(10, cfg) == lr_at(79, cfg) == lr_at(80, cfg) == 1e-3  # stable, and the decay's first step
    assert lr_at(81, cfg) == pytest.approx(1e-4 + (1 - math.sqrt(1 / 20)) * 9e-4)  # 1 - sqrt shape
    assert lr_at(90, cfg) == pytest.approx(1e-4 + (1 - math.sqrt(0.5)) * 9e-4)
    assert lr_at(99, cfg) > 1e-4 and lr_at(100, cfg) == lr_at(500, cfg) == pytest.approx(1e-4)
    opt = build_optimizer(build_model(cfg.model, seed=0), cfg, CPU)
    assert set_lr(opt, 90, cfg) == lr_at(90, cfg)
    assert {g["lr"] for g in opt.param_groups} == {lr_at(90, cfg), lr_at(90, cfg, 0.02)}
    assert lr_at(90, cfg, 0.02) == pytest.approx(20 * lr_at(90, cfg))  # both lrs follow one schedule
    cfg.optim.decay_fraction = 0.0  # no decay at all: constant after warmup
    assert lr_at(99, cfg) == 1e-3


def test_extending_a_wsd_run_from_its_stable_phase_is_an_info_line_not_a_warning() -> None:
    wsd = {"lr_schedule": "wsd", "max_steps": 1000, "warmup_steps": 10, "decay_fraction": 0.2}
    old = build_config("quickstart", cli=wsd)
    longer = build_config("quickstart", cli={**wsd, "max_steps": 2000})
    change = schedule_change(old.to_dict(), longer, 600)
    assert not change.warning and lr_at(600, longer) == lr_at(600, old)
    assert change.message == ("resuming a WSD run with max_steps 1000 -> 2000: the lr at step 600 stays 4.00e-03; its "
                              "decay now runs from step 1,600 to 2,000 (was 800 to 1,000)")
    # From inside its decay the lr would jump back to the peak: a warning that says how to avoid it.
    change = schedule_change(old.to_dict(), longer, 900)
    assert change.warning and "becomes 4.00e-03" in change.message and "before step 800" in change.message
    # A cosine run's lr depends on max_steps everywhere: still the warning it always was.
    cos = build_config("quickstart", cli={"max_steps": 1000})
    assert schedule_change(cos.to_dict(), build_config("quickstart", cli={"max_steps": 2000}), 600).warning
    assert schedule_change(old.to_dict(), old, 600) is None


def test_decay_now_starts_the_cooldown_at_the_resume_step_and_continues_one_in_progress() -> None:
    saved = build_config("quickstart", cli={"lr_schedule": "wsd", "max_steps": 100_000, "decay_fraction": 0.2})
    for step in (600, 601, 5_003, 77_777):
        cfg = copy.deepcopy(saved)
        cfg.optim.decay_now = True
        line = start_decay_now(saved.to_dict(), cfg, step)
        o = cfg.optim
        assert decay_start(o) == step and not o.decay_now and f"from step {step:,}" in line
        assert abs((o.max_steps - step) - 0.2 * o.max_steps) <= 1  # the decay is a fifth of the whole run
        assert lr_at(step, cfg) == o.learning_rate > lr_at(step + 1, cfg) and lr_at(o.max_steps, cfg) == pytest.approx(
            o.learning_rate * o.min_lr_ratio)
    # Resumed again inside that cooldown, with the same command line (--decay_now, the old max_steps): continued.
    cooling = cfg.to_dict()
    again = copy.deepcopy(saved)
    again.optim.decay_now = True
    line = start_decay_now(cooling, again, 80_000)
    assert again.optim.max_steps == cfg.optim.max_steps and "continuing it" in line
    assert lr_at(80_000, again) == lr_at(80_000, cfg)


def test_bad_optimizer_and_schedule_values_are_reported_at_once() -> None:
    cfg = build_config("quickstart", cli={"optimizer": "sgd", "lr_schedule": "linear", "decay_fraction": 1.5,
                                          "muon_momentum": 1.0, "decay_now": True})
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    msg = str(e.value)
    for part in ("optimizer must be 'adamw' or 'muon'", "lr_schedule must be 'cosine' or 'wsd'",
                 "decay_fraction must be in [0, 1]", "muon_momentum in [0, 1)", "--decay_now starts the cooldown"):
        assert part in msg, part
