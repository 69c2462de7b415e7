"""The compiled training forward, read from the FX graphs dynamo hands to the backend: every GPT2Block runs one
shared graph whose SDPA call is causal with no mask tensor (FlashAttention-eligible), the lm_head and the loss are
one graph that returns only a scalar, there are no graph breaks, and the numbers equal the eager model's. The
recording backend runs the captured graphs as they are (no inductor), so this is fast on CPU; inductor itself
runs in the GPU check's dry run (tests/test_gpu_check.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch._dynamo.utils import counters

from hf_gpt2_train.config import ModelConfig, PrecisionConfig
from hf_gpt2_train.model import build_model, lm_head_loss, setup_training_forward
from hf_gpt2_train.precision import plan_precision, prepare_model_for_precision

# 12 blocks, like gpt2: more than dynamo's default recompile limit (8), so a per-block recompile would show.
# vocab 2000 padded to 2048: the padded rows are real.
SMALL = ModelConfig(n_layer=12, n_head=4, n_embd=64, n_positions=64, vocab_size=2000, pad_vocab_multiple=64)


class GraphRecorder:
    """A dynamo backend that keeps every FX graph it is given and runs it unchanged."""

    def __init__(self):
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def calls(self, name: str) -> list[tuple[int, torch.fx.Node]]:
        return [(i, n) for i, g in enumerate(self.graphs) for n in g.graph.nodes
                if n.op == "call_function" and name in str(n.target)]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    torch._dynamo.reset()
    AcceleratorState._reset_state(reset_partial_state=True)


def _batch(seed: int = 0, b: int = 2, t: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SMALL.vocab_size, (b, t + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


@pytest.mark.parametrize("precision", ["no", "bf16", "fp8"])
def test_prepared_training_forward_compiles_causal_blocks_and_a_scalar_loss(precision, fresh_dynamo):
    cfg = (PrecisionConfig(mixed_precision="fp8", fp8_emulate=True, fp8_min_dim=16) if precision == "fp8"
           else PrecisionConfig(mixed_precision=precision))
    plan = plan_precision(cfg, "cpu")
    accelerator = Accelerator(**plan.accelerator_kwargs(), cpu=True)
    eager = prepare_model_for_precision(build_model(SMALL, seed=0), plan, cfg)
    compiled = prepare_model_for_precision(build_model(SMALL, seed=0), plan, cfg)
    recorder = GraphRecorder()
    setup_training_forward(compiled, True, compile_blocks=plan.compile_blocks, backend=recorder)
    assert compiled.padded_logits  # the compiled loss runs the GEMM over the padded vocabulary
    keys = list(compiled.state_dict())
    compiled = accelerator.prepare(compiled)  # what the trainer runs: Accelerate's autocast/fp32-output wrappers
    assert list(accelerator.unwrap_model(compiled).state_dict()) == keys == list(eager.state_dict())  # no _orig_mod.

    x, y = _batch()
    loss = compiled(input_ids=x, targets=y)
    loss.backward()
    assert loss.shape == () and loss.dtype == torch.float32

    assert dict(counters["graph_break"]) == {}
    assert len(recorder.graphs) == 2  # one graph for all 12 blocks, one for lm_head + loss
    sdpa = recorder.calls("scaled_dot_product_attention")
    assert len(sdpa) == 1
    block_graph, node = sdpa[0]
    assert node.kwargs.get("is_causal") is True and node.kwargs.get("attn_mask") is None, node.kwargs
    assert len(node.args) == 3  # q, k, v only: no mask tensor positional either
    ce = recorder.calls("cross_entropy")
    assert len(ce) == 1 and ce[0][0] != block_graph
    loss_graph = recorder.graphs[ce[0][0]]
    (out,) = [n for n in loss_graph.graph.nodes if n.op == "output"]
    result = out.args[0]
    leaving = list(result) if isinstance(result, (tuple, list)) else [result]
    assert [tuple(a.meta["example_value"].shape) for a in leaving] == [()]  # only the scalar leaves

    # Same numbers as the eager model with real-vocabulary logits (fp32 and emulated fp8 exactly enough; bf16 loosely).
    with accelerator.autocast():
        ref = eager(input_ids=x, targets=y)
    ref.backward()
    tol = 2e-2 if precision == "bf16" else 1e-5
    assert loss.item() == pytest.approx(ref.item(), abs=tol)
    g, g_ref = accelerator.unwrap_model(compiled).transformer.wte.weight.grad, eager.transformer.wte.weight.grad
    assert torch.allclose(g, g_ref, atol=tol * 10, rtol=tol * 10)


def test_evaluation_forward_runs_eagerly_at_every_length(fresh_dynamo):
    """Sampling grows the input by one token per call: the logits path must never compile (or recompile)."""
    model = build_model(SMALL, seed=0)
    recorder = GraphRecorder()
    setup_training_forward(model, True, backend=recorder)
    x, y = _batch()
    model(input_ids=x, targets=y).backward()
    n = len(recorder.graphs)
    with torch.no_grad():
        for t in (1, 5, 17, 64):
            logits = model(input_ids=x[:, :1].repeat(1, t)).logits
            assert logits.shape == (2, t, SMALL.padded_vocab_size)
    assert len(recorder.graphs) == n


def test_padded_rows_get_no_probability_mass():
    """Padded logits and real-vocabulary logits give the same loss and gradients, even when the padded rows of
    the tied embedding are large enough to take most of the mass if they were in the softmax."""
    model = build_model(SMALL, seed=0)
    with torch.no_grad():
        model.transformer.wte.weight[SMALL.vocab_size:] = 5.0
    hidden = torch.randn(2, 32, SMALL.n_embd, requires_grad=True)
    _, y = _batch()
    losses, grads = [], []
    for padded in (True, False):
        loss = lm_head_loss(model.lm_head, hidden, y, SMALL.vocab_size, padded)
        (g,) = torch.autograd.grad(loss, hidden)
        losses.append(loss)
        grads.append(g)
    assert torch.allclose(losses[0], losses[1], atol=1e-6) and torch.allclose(grads[0], grads[1], atol=1e-6)
    everything = F.cross_entropy(model.lm_head(hidden).reshape(-1, SMALL.padded_vocab_size), y.reshape(-1))
    assert everything.item() > losses[0].item() + 1.0  # the check above could fail: the padded rows are not inert


def test_an_accelerate_config_dynamo_backend_compiles_blocks_not_the_whole_model(tmp_path, monkeypatch,
                                                                                fresh_dynamo):
    """`accelerate config` with a dynamo_backend sets ACCELERATE_DYNAMO_BACKEND: Accelerate alone would then
    torch.compile the whole model in prepare() (SDPA with a [B,1,T,T] mask, no flash). The trainer takes it as a
    request for its own per-block compile instead. Only the Trainer is built (nothing is compiled yet)."""
    from accelerate.utils import is_compiled_module

    from hf_gpt2_train.config import build_config
    from hf_gpt2_train.trainer import Trainer

    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    cfg = build_config("quickstart", cli={"output_dir": str(tmp_path / "run"), "max_steps": 1, "val_batches": 1,
                                          "report_to": "none"})  # in-process: no tracker threads left behind
    trainer = Trainer(cfg)
    assert not is_compiled_module(trainer.model)
    blocks = trainer.accelerator.unwrap_model(trainer.model).transformer.h
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert trainer.run_info["compile"] is True
    assert "dynamo_backend inductor: compiling each GPT2Block" in (tmp_path / "run" / "train.log").read_text()
