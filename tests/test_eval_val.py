"""Validation loss: the mean token loss over the fixed batches, in eval mode, mode restored."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from hf_gpt2_train.config import ModelConfig
from hf_gpt2_train.data.tokenizer import get_encoding
from hf_gpt2_train.evaluate.val import val_loss
from hf_gpt2_train.model import build_model


def _batches(shared_data: Path, n: int, bsz: int, seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    enc = get_encoding()
    data = torch.tensor(enc.encode((shared_data / "tinyshakespeare.txt").read_text()[:40_000]))
    out = []
    for b in range(n):
        rows = [data[(b * bsz + i) * seq: (b * bsz + i) * seq + seq + 1] for i in range(bsz)]
        out.append((torch.stack([r[:-1] for r in rows]), torch.stack([r[1:] for r in rows])))
    return out


def test_val_loss_equals_reference_mean(shared_data) -> None:
    model = build_model(ModelConfig(n_layer=2, n_head=2, n_embd=64, n_positions=64, dropout=0.2), seed=1)
    model.train()
    batches = _batches(shared_data, 3, 2, 48)
    acc = Accelerator(cpu=True)
    got = val_loss(model, batches, acc, 50257)
    assert model.training  # restored
    # reference: every target token's -log p, averaged, model in eval mode (no dropout)
    model.eval()
    nll = []
    with torch.no_grad():
        for x, y in batches:
            logp = torch.log_softmax(model(input_ids=x).logits[..., :50257].float(), -1)
            nll.append(-logp.gather(-1, y.unsqueeze(-1)).flatten())
    ref = torch.cat(nll).mean().item()
    assert abs(got - ref) < 1e-5, (got, ref)
    assert 9.0 < got < 12.0  # an untrained GPT-2 is near ln(50257) = 10.8
    model.train()
    assert val_loss(model, batches, acc, 50257) == got  # deterministic despite dropout 0.2: eval mode


def test_padded_rows_get_no_probability(shared_data) -> None:
    """Raising the padded rows' logits must not change val_loss: they are sliced off before the softmax."""
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64), seed=2)
    batches = _batches(shared_data, 2, 2, 32)
    acc = Accelerator(cpu=True)
    before = val_loss(model, batches, acc, 50257)
    with torch.no_grad():
        model.transformer.wte.weight[50257:] = 5.0
    assert val_loss(model, batches, acc, 50257) == before
