"""A short token-efficiency check that can fail: Muon + WSD with 2/3 of the tokens must beat AdamW + cosine.

The product's own pieces (``build_model``, ``build_optimizer``, ``set_lr``, clipping as the trainer does) in one
process on real text (tiny Shakespeare, GPT-2 BPE), the quickstart model, the same 512-token batches in the same
order. AdamW + cosine trains 48 steps at lr 8e-3, the best of 4e-3 / 8e-3 / 1.6e-2 in this setting (measured
2026-12-04: validation loss 6.51 / 6.50 / 6.52 at 60 steps); Muon + WSD (muon lr 0.04, AdamW lr 8e-3 for the
embeddings) trains 32 (measured 2026-12-04: 6.47 vs AdamW's 6.57; Muon 24 steps: 6.63; Muon 24 steps with muon lr
0, i.e. block matrices frozen: 7.20). A Muon that does not orthogonalise, scales its update wrongly, mixes Q/K/V, or whose
schedule is off loses this comparison. docs/speed.md has the full measurement this reproduces in small.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hf_gpt2_train.config import build_config
from hf_gpt2_train.data.tokenizer import get_encoding
from hf_gpt2_train.model import build_model
from hf_gpt2_train.optim import build_optimizer, set_lr

SEQ, BATCH, VAL_TOKENS = 64, 8, 8192


def train_and_validate(tokens: torch.Tensor, steps: int, **optim: object) -> float:
    """``steps`` optimizer steps over consecutive training windows; the validation loss after them."""
    val, train = tokens[:VAL_TOKENS], tokens[VAL_TOKENS:]
    cfg = build_config("quickstart", cli={"max_steps": steps, "warmup_steps": 6, **optim})
    model = build_model(cfg.model, seed=0)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    n = BATCH * SEQ
    for step in range(steps):
        window = train[step * n:(step + 1) * n + 1]
        set_lr(opt, step, cfg)
        model(input_ids=window[:-1].view(BATCH, SEQ), targets=window[1:].view(BATCH, SEQ)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        v = val[:16 * SEQ + 1]
        return float(model(input_ids=v[:-1].view(16, SEQ), targets=v[1:].view(16, SEQ)))


def test_muon_wsd_beats_adamw_cosine_with_two_thirds_of_the_tokens(shared_data: Path) -> None:
    text = (shared_data / "tinyshakespeare.txt").read_text()
    tokens = torch.tensor(get_encoding("").encode_ordinary(text))
    adamw = train_and_validate(tokens, 48, optimizer="adamw", lr_schedule="cosine", learning_rate=8e-3)
    muon = train_and_validate(tokens, 32, optimizer="muon", lr_schedule="wsd", learning_rate=8e-3,
                              muon_learning_rate=0.04)
    assert muon < adamw, f"Muon + WSD after 32 steps: val loss {muon:.4f}; AdamW + cosine after 48: {adamw:.4f}"
