"""Test harness: the real ``hf-gpt2-train`` CLI on CPU processes with Accelerate's FSDP2 code path forced on.

Accelerate enables FSDP only on GPU backends: on gloo/CPU processes its state stays ``MULTI_CPU`` (DDP) even
with ``ACCELERATE_USE_FSDP=true``. This harness sets Accelerate's own FSDP environment variables (FSDP2,
``GPT2Block`` wrapping, full shard) and switches a ``MULTI_CPU`` ``AcceleratorState`` to ``FSDP`` with the plugin
Accelerate built from them, before the Trainer starts; everything else (``prepare`` -> ``fully_shard``,
``clip_grad_norm_``, ``save_state``/``load_state``'s FSDP branches, our checkpoint manager) is the product's code.
It lives in tests only: the product never forces FSDP.

Usage (the arguments after ``train`` are exactly those of ``python -m hf_gpt2_train train``)::

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m tests.fsdp_harness train ARGS...
    ACCELERATE_USE_CPU=1 FSDP_STATE_DICT_TYPE=SHARDED_STATE_DICT torchrun ... -m tests.fsdp_harness train ARGS...

``FSDP_STATE_DICT_TYPE`` (Accelerate's variable) is ``FULL_STATE_DICT`` (default here) or ``SHARDED_STATE_DICT``;
``--fsdp_state_dict_type FULL_STATE_DICT|SHARDED_STATE_DICT`` anywhere on the command line does the same. Any
other subcommand (``export``, ``eval``) runs unchanged. ``scripts/gpu_check.sh``'s CPU dry run calls it like this.
"""

from __future__ import annotations

import os
import sys

STATE_DICT_TYPES = ("FULL_STATE_DICT", "SHARDED_STATE_DICT")


def enable_fsdp2_on_cpu(state_dict_type: str = "FULL_STATE_DICT") -> None:
    """Make the next ``Accelerator`` of this process use FSDP2 even though its backend is gloo/CPU."""
    if state_dict_type not in STATE_DICT_TYPES:
        raise SystemExit(f"fsdp_harness: state dict type must be one of {', '.join(STATE_DICT_TYPES)}, "
                         f"not {state_dict_type!r}")
    os.environ.update({
        "ACCELERATE_USE_FSDP": "true",  # Accelerator builds its FullyShardedDataParallelPlugin from these
        "FSDP_VERSION": "2",
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_TRANSFORMER_CLS_TO_WRAP": "GPT2Block",
        "FSDP_STATE_DICT_TYPE": state_dict_type,
        "FSDP_RESHARD_AFTER_FORWARD": "true",
        "FSDP_CPU_RAM_EFFICIENT_LOADING": "false",
        "FSDP_OFFLOAD_PARAMS": "false",
    })
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_fsdp_harness", False):
        return

    def init(self, *args, fsdp_plugin=None, **kwargs):  # type: ignore[no-untyped-def]
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP  # what the GPU branch of AcceleratorState.__init__ does
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    init._fsdp_harness = True  # type: ignore[attr-defined]
    AcceleratorState.__init__ = init  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    kind = None
    for i, a in enumerate(args):
        if a == "--fsdp_state_dict_type" and i + 1 < len(args):
            kind = args[i + 1]
            del args[i:i + 2]
            break
        if a.startswith("--fsdp_state_dict_type="):
            kind = a.split("=", 1)[1]
            del args[i]
            break
    kind = kind or os.environ.get("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT")
    if args[:1] == ["train"]:
        enable_fsdp2_on_cpu(kind)
    from hf_gpt2_train.cli import main as cli_main

    return int(cli_main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
