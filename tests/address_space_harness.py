"""Test harness: the real ``hf-gpt2-train`` CLI under an address-space limit (``ulimit -v``) set relative to what
the process has mapped once torch and the trainer are imported, so that a test can give training a known amount of
memory on any machine. Allocations past the limit fail catchably (torch's "DefaultCPUAllocator: can't allocate
memory"), which is what ``--per_device_train_batch_size auto`` searches with on CPU (``memory.search_allowed``).

Usage: ``python -m tests.address_space_harness HEADROOM_MB train ARGS...`` (ARGS as for ``hf-gpt2-train train``).
Set ``MALLOC_ARENA_MAX=2`` too: each extra glibc malloc arena reserves 64 MB of address space.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path


def mapped_bytes() -> int:
    """This process's virtual memory size (VmSize)."""
    return int(re.search(r"VmSize:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def main(argv: list[str]) -> int:
    headroom_mb, args = float(argv[0]), argv[1:]
    import torch  # noqa: F401  everything a run maps before it allocates much

    import hf_gpt2_train.trainer  # noqa: F401

    limit = mapped_bytes() + int(headroom_mb * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print(f"address_space_harness: RLIMIT_AS {limit / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    from hf_gpt2_train.cli import main as cli_main

    return int(cli_main(args) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
