"""Generated samples: seeded, top-k, real vocabulary only, global RNG untouched, context cropped."""

from __future__ import annotations

import pytest
import tiktoken
import torch

from hf_gpt2_train.config import ModelConfig
from hf_gpt2_train.data.tokenizer import get_encoding
from hf_gpt2_train.evaluate.samples import generate_samples, sample_token_ids
from hf_gpt2_train.model import build_model

SMALL = ModelConfig(n_layer=2, n_head=2, n_embd=64, n_positions=64)
PROMPTS = ["Hello, I'm a language model,", "The meaning of life is"]


@pytest.fixture(scope="module")
def enc() -> tiktoken.Encoding:
    return get_encoding()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model(SMALL, seed=7)


def test_same_seed_same_samples_other_seed_other_samples(model, enc) -> None:
    a = generate_samples(model, enc, PROMPTS, 12, 50, seed=1, vocab_size=50257, device="cpu")
    b = generate_samples(model, enc, PROMPTS, 12, 50, seed=1, vocab_size=50257, device="cpu")
    c = generate_samples(model, enc, PROMPTS, 12, 50, seed=2, vocab_size=50257, device="cpu")
    assert a == b and len(a) == 2 and all(s for s in a)
    assert a != c
    ids = sample_token_ids(model, [enc.encode(p) for p in PROMPTS], 12, 50, 1, 50257, "cpu")
    assert [enc.decode(t) for t in ids] == a and all(len(t) == 12 for t in ids)


def test_global_rng_untouched_and_mode_restored(model, enc) -> None:
    model.train()
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    generate_samples(model, enc, PROMPTS, 8, 50, seed=1, vocab_size=50257, device="cpu")
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(5), expected)
    assert model.training  # sampling ran in eval mode and switched back


def test_top_k_one_is_greedy(model, enc) -> None:
    prompt = enc.encode(PROMPTS[0])
    x = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(10):
            nxt = model(input_ids=x).logits[0, -1, :50257].argmax()
            x = torch.cat([x, nxt.view(1, 1)], dim=1)
    got = sample_token_ids(model, [prompt], 10, top_k=1, seed=5, vocab_size=50257, device="cpu")
    assert got == [x[0, len(prompt):].tolist()]


def test_padded_vocab_rows_never_sampled(enc) -> None:
    """Make the padded rows (50257..50303) the most likely tokens by far: sampling must still skip them."""
    m = build_model(SMALL, seed=0).eval()
    with torch.no_grad():
        m.transformer.ln_f.weight.zero_()
        m.transformer.ln_f.bias.fill_(1.0)  # every final hidden state is all-ones
        m.transformer.wte.weight[50257:] = 1.0  # (tied lm_head) padded logits = 64, real ones ~ +-0.2
        hidden = m.transformer(input_ids=torch.tensor([[0]])).last_hidden_state[0, -1]
        full = hidden @ m.lm_head.weight.t()  # logits over all 50304 rows of the padded head
    assert m.config.vocab_size == 50304 and full.argmax().item() >= 50257  # unmasked padded rows would win
    ids = sample_token_ids(m, [enc.encode(p) for p in PROMPTS], 20, 0, seed=3, vocab_size=50257, device="cpu")
    flat = [t for row in ids for t in row]
    assert len(flat) == 40 and max(flat) < 50257


def test_prompt_longer_than_context_is_cropped(model, enc) -> None:
    long_prompt = " ".join(["word"] * 100)  # 100 tokens > n_positions 64
    assert len(enc.encode(long_prompt)) > SMALL.n_positions
    out = sample_token_ids(model, [enc.encode(long_prompt)], 5, 50, 0, 50257, "cpu")
    assert len(out[0]) == 5
