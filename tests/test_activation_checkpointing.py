"""Activation checkpointing per GPT2Block (hf_gpt2_train/activation_checkpointing.py), in process: every mode gives
the eager model's loss and gradients bit for bit (fp32 and emulated fp8) while keeping less memory (counted by the
allocator), leaves parameter names alone, and under per-block compile the checkpoint is traced inside the block's
graph with SDPA still causal and maskless. The CLI runs (each mode trains and resumes, across modes too; the FSDP2
harness with `full`) are in tests/test_memory_e2e.py and tests/test_fsdp.py."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from hf_gpt2_train.activation_checkpointing import apply_activation_checkpointing, checkpointed_blocks
from hf_gpt2_train.config import ModelConfig, PrecisionConfig
from hf_gpt2_train.memory import StepMemory
from hf_gpt2_train.model import build_model, setup_training_forward
from hf_gpt2_train.precision import plan_precision, prepare_model_for_precision
from tests.test_compile import SMALL, GraphRecorder, _batch, fresh_dynamo  # noqa: F401  (a fixture)

MODES = ("none", "full", "selective")


def _model(mode: str, every: int = 1, fp8: bool = False, cfg: ModelConfig = SMALL) -> torch.nn.Module:
    model = build_model(cfg, seed=0)
    if fp8:
        pc = PrecisionConfig(mixed_precision="fp8", fp8_emulate=True, fp8_min_dim=16)
        model = prepare_model_for_precision(model, plan_precision(pc, "cpu"), pc)
    apply_activation_checkpointing(model, mode, every)
    return model


def _loss_and_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    loss = model(input_ids=x, targets=y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8-emulated"])
def test_every_mode_computes_the_same_loss_and_gradients_bit_for_bit(fp8):
    x, y = _batch(seed=1)
    reference = _model("none", fp8=fp8)
    ref_loss, ref_grads = _loss_and_grads(reference, x, y)
    for mode, every in (("full", 1), ("selective", 1)) + (() if fp8 else (("full", 3),)):
        model = _model(mode, every, fp8=fp8)
        assert checkpointed_blocks(model) == list(range(0, SMALL.n_layer, every))
        assert list(model.state_dict()) == list(reference.state_dict())  # checkpoints move across modes
        loss, grads = _loss_and_grads(model, x, y)
        assert torch.equal(loss, ref_loss), (mode, every)
        assert all(torch.equal(grads[n], g) for n, g in ref_grads.items()), (mode, every)
    with torch.no_grad():  # evaluation: nothing is checkpointed, the stock forward gives the same logits
        assert torch.equal(model(input_ids=x).logits, reference(input_ids=x).logits)


def test_full_keeps_at_most_half_the_activation_memory_and_selective_sits_between():
    """The allocator's own count (memory.StepMemory: the profiler's CPU allocation events) of what a forward+backward
    adds, less the same at a near-zero batch. Blocks dominate here (a 2,048-row vocabulary), as they do at gpt2 size
    on a GPU; the lm_head/loss region, which no mode checkpoints, is measured at its real share in docs/benchmarks.md."""
    cfg = ModelConfig(n_layer=4, n_head=4, n_embd=128, n_positions=256, vocab_size=2000)
    added: dict[str, int] = {}
    for mode in MODES:
        model = _model(mode, cfg=cfg)
        peaks = []
        for b, t in ((2, 256), (1, 8)):
            x = torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(0))
            with StepMemory("cpu") as m:
                model(input_ids=x, targets=x).backward()
                model.zero_grad(set_to_none=True)
            peaks.append(m.peak_bytes)
        added[mode] = peaks[0] - peaks[1]
    assert added["full"] <= 0.5 * added["none"], added
    assert added["full"] < added["selective"] < added["none"], added


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_compiled_blocks_trace_the_checkpoint_with_causal_maskless_sdpa(mode, fresh_dynamo):  # noqa: F811
    """Checkpointing is applied before the per-block compile, so it is traced inside the block's graph (a
    tag_activation_checkpoint op whose body calls SDPA): one graph for all 12 blocks, one for the loss, no graph
    break, SDPA with is_causal=True and no mask tensor, and the eager model's numbers."""
    x, y = _batch()
    ref_loss, ref_grads = _loss_and_grads(_model("none"), x, y)
    model = _model(mode)
    recorder = GraphRecorder()
    setup_training_forward(model, True, backend=recorder)
    loss, grads = _loss_and_grads(model, x, y)
    assert dict(counters["graph_break"]) == {}
    assert len(recorder.graphs) == 2
    block = next(g for g in recorder.graphs if any("tag_activation_checkpoint" in str(n.target)
                                                   for n in g.graph.nodes))
    sdpa = [n for sub in block.modules() if isinstance(sub, torch.fx.GraphModule) and sub is not block
            for n in sub.graph.nodes if "scaled_dot_product_attention" in str(n.target)]
    assert len(sdpa) == 1 and not any("scaled_dot_product" in str(n.target) for n in block.graph.nodes)
    assert sdpa[0].kwargs.get("is_causal") is True and sdpa[0].kwargs.get("attn_mask") is None
    assert len(sdpa[0].args) == 3
    assert torch.equal(loss, ref_loss) and all(torch.equal(grads[n], g) for n, g in ref_grads.items())


def test_aot_autograd_recomputes_and_matches_eager(fresh_dynamo):  # noqa: F811
    """Through AOT autograd (the partitioner that plans the recomputation; inductor adds only codegen on top), the
    selective policy's graph still gives the eager gradients bit for bit."""
    x, y = _batch()
    ref_loss, ref_grads = _loss_and_grads(_model("none"), x, y)
    model = _model("selective")
    setup_training_forward(model, True, backend="aot_eager")
    loss, grads = _loss_and_grads(model, x, y)
    assert torch.equal(loss, ref_loss) and all(torch.equal(grads[n], g) for n, g in ref_grads.items())


def test_an_unknown_mode_is_refused_by_the_config_in_one_line():
    from hf_gpt2_train.config import ConfigError, build_config

    cfg = build_config("quickstart", cli={"activation_checkpointing": "most", "activation_checkpointing_every": 0})
    with pytest.raises(ConfigError, match="none/full/selective.*'most'.*>= 1"):
        cfg.validate()
