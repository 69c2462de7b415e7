"""The ``end`` Hub strategy: export ``final`` and push it once training is over, on the main process.

Order at the end of a multi-process run (the trainer calls :func:`push_at_end` between its last
collective and ``accelerator.end_training()``, which destroys the process group):

1. every rank has finished the final checkpoint (``wait_for_everyone``);
2. the main process exports and uploads; the other processes wait for it on a dedicated gloo group whose
   timeout (:data:`END_PUSH_WAIT`) is longer than any upload: a gpt2-xl push takes longer than NCCL's
   default 10 minutes, and a rank that timed out (or exited and made the launcher stop the job) would
   cut the upload short;
3. ``end_training()`` on every rank.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

END_PUSH_WAIT = timedelta(hours=12)
"""How long the other processes wait for the main process's export and upload."""


def push_at_end(accelerator: Any, output_dir: str | Path, cfg: Any) -> bool:
    """Export and push ``OUTPUT_DIR/checkpoints/final`` (main process); True when it worked (True elsewhere).

    Call on every process. Failures are logged as one line by the main process (the checkpoints are safe
    on disk and the export is kept for ``hf-gpt2-train push``); they never raise.
    """
    group = None
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        # A CPU group of its own: its timeout is independent of the training group's (NCCL, short).
        group = dist.new_group(backend="gloo", timeout=END_PUSH_WAIT)
    ok = True
    if accelerator.is_main_process:
        from hf_gpt2_train.hub.push import export_and_push_after_training

        ok = export_and_push_after_training(output_dir, cfg).ok
    if group is not None:
        import torch.distributed as dist

        # The others wait here, up to END_PUSH_WAIT, until the main process arrives after its upload.
        dist.monitored_barrier(group=group, timeout=END_PUSH_WAIT)
        dist.destroy_process_group(group)
    return ok
