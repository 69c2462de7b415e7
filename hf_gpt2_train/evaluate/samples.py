"""Generated samples: top-k sampling from fixed prompts, seeded so evaluations are comparable."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from hf_gpt2_train.evaluate.common import base_model, eval_mode, supports_logits_to_keep

EOT = 50256  # <|endoftext|> in tiktoken's gpt2 encoding


def sample_token_ids(model: nn.Module, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, top_k: int,
                     seed: int, vocab_size: int, device: torch.device | str,
                     autocast: Callable[[], AbstractContextManager] | None = None) -> list[list[int]]:
    """The ``max_new_tokens`` sampled token ids that follow each prompt (top-k sampling).

    * A dedicated ``torch.Generator`` seeded with ``seed`` draws every token, so the same weights give the
      same samples at every evaluation and torch's global RNG (saved in checkpoints, driving dropout and
      data order) is left untouched.
    * Logits are sliced to ``vocab_size``: padded embedding rows can never be sampled.
    * The context is cropped to the model's last ``n_positions`` tokens.
    * Every prompt runs exactly ``max_new_tokens`` forwards, so ranks that sample together make the same
      number of calls (a wrapper that communicates in its forward stays in step).
    """
    dev = torch.device(device)
    n_pos = base_model(model).config.n_positions
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    k = min(top_k, vocab_size) if top_k > 0 else vocab_size
    # only the last position's logits are needed: skip the lm_head elsewhere when the model can
    kwargs = {"logits_to_keep": 1} if supports_logits_to_keep(model) else {}
    out: list[list[int]] = []
    with eval_mode(model), torch.no_grad(), (autocast or contextlib.nullcontext)():
        for ids in prompt_ids:
            start = list(ids) or [EOT]  # an empty prompt starts from <|endoftext|>, as GPT-2 does
            x = torch.tensor([start], dtype=torch.long, device=dev)
            for _ in range(max_new_tokens):
                logits = model(input_ids=x[:, -n_pos:], **kwargs).logits[:, -1, :vocab_size].float()
                top_vals, top_idx = torch.topk(logits, k, dim=-1)
                choice = torch.multinomial(torch.softmax(top_vals, dim=-1), 1, generator=gen)
                x = torch.cat([x, torch.gather(top_idx, -1, choice)], dim=1)
            out.append(x[0, len(start):].tolist())
    return out


def generate_samples(model: nn.Module, enc: Any, prompts: Sequence[str], max_new_tokens: int, top_k: int,
                     seed: int, vocab_size: int, device: torch.device | str,
                     autocast: Callable[[], AbstractContextManager] | None = None) -> list[str]:
    """Completions (text after each prompt) by :func:`sample_token_ids`, cut at the first ``<|endoftext|>``."""
    ids = sample_token_ids(model, [enc.encode(p, allowed_special="all") for p in prompts], max_new_tokens, top_k, seed, vocab_size,
                           device, autocast)
    return [enc.decode(t[: t.index(EOT)] if EOT in t else t) for t in ids]
