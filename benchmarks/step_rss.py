"""Peak RSS per --activation_checkpointing mode: a cross-check of bench's allocator-level memory, on CPU.

Each mode runs in its own process (peak RSS only grows): the model and fused AdamW are built, one optimizer step at a
near-zero micro-batch (1 x 8 tokens, 2 accumulation steps) creates the optimizer state and sets the reference peak,
then one step at the real micro-batch. The difference of the two peaks is what the real step's activations add on
top of weights, gradients and optimizer state, as the operating system counts it (glibc's heap included).

    python benchmarks/step_rss.py --n_layer 12 --n_embd 512 --seq_len 512 --micro_batch 4

glibc keeps freed large blocks in its heap once its dynamic mmap threshold has risen, so by default RSS counts
1.2-1.4 GB here beyond what torch's allocator holds; ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment fixes the
threshold and RSS then agrees with the allocator (figures: docs/benchmarks.md, Memory).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def one_mode(args: argparse.Namespace) -> dict:
    import torch

    from hf_gpt2_train.activation_checkpointing import apply_activation_checkpointing
    from hf_gpt2_train.config import ModelConfig
    from hf_gpt2_train.model import build_model

    cfg = ModelConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_embd // 64, n_positions=args.seq_len)
    model = build_model(cfg, seed=0)
    apply_activation_checkpointing(model, args.mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    gen = torch.Generator().manual_seed(0)

    def step(b: int, t: int) -> float:
        losses = []
        for _ in range(2):  # 2 accumulation steps: the second forward runs with the first's gradients alive
            x = torch.randint(0, cfg.vocab_size, (b, t), generator=gen)
            loss = model(input_ids=x, targets=x) / 2
            loss.backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        return sum(losses)

    step(1, 8)
    base = peak_rss_bytes()
    loss = step(args.micro_batch, args.seq_len)
    peak = peak_rss_bytes()
    return {"mode": args.mode, "near_zero_peak_rss_gb": base / 2**30, "peak_rss_gb": peak / 2**30,
            "step_adds_gb": (peak - base) / 2**30, "loss": loss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=512)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--modes", default="none,full,selective")
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print(json.dumps(one_mode(args)))
        return
    rows = []
    for mode in args.modes.split(","):
        argv = [sys.executable, __file__, "--mode", mode] + [f"--{k}={getattr(args, k)}" for k in
                                                               ("n_layer", "n_embd", "seq_len", "micro_batch")]
        rows.append(json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
