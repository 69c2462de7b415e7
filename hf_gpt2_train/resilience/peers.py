"""A lost peer: another process of a multi-process run died (its node crashed, was killed or preempted, or the
network between them failed). The collective this process was in fails with a backend error (gloo: "Connection
closed by peer", NCCL: a communicator error or a timeout); ``lost_peer_message`` turns it into one line that
says what happened and what recovers the run, instead of a traceback from inside autograd or a collective.
The process then exits with ``errors.EXIT_PEER_LOST`` so that torchrun ``--max_restarts`` restarts the workers
of every node, which resume from ``checkpoints/latest`` (``--resume_from_checkpoint auto``).

What bounds the wait when a node does not come back (docs/clusters.md): torchrun's rendezvous ``join_timeout``
(``--rdzv_conf join_timeout=SECONDS``, 600 by default) for a restart that waits for the lost node; the hang
watchdog (``--hang_timeout_minutes``) and the collective timeout (``--collective_timeout_minutes``) for a peer
that vanished without closing its connections (power loss, a cut network), where no error arrives at all.
"""

from __future__ import annotations

from hf_gpt2_train import launch_world_size

# What the backends say when the other side of a collective went away (gloo's TCP transport, NCCL, the store).
PEER_LOST_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
                   "Timed out waiting", "Socket Timeout", "NCCL communicator was aborted",
                   "Watchdog caught collective operation timeout", "ncclRemoteError")


def lost_peer_message(exc: BaseException) -> str | None:
    """One line for an error that means another process of this run is gone, else None."""
    if launch_world_size() < 2 or not isinstance(exc, RuntimeError):
        return None
    text = str(exc)
    if not any(sign in text for sign in PEER_LOST_SIGNS):
        return None
    detail = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if detail.startswith("[") and "] " in detail:  # "[.../gloo/transport/tcp/pair.cc:553] Connection closed..."
        detail = detail.split("] ", 1)[1]
    detail = detail.split(". This is typically")[0]
    return (f"lost contact with another process of this run ({detail}): its node or process stopped (crash, kill, "
            "preemption or network); checkpoints on disk are intact. Under torchrun --max_restarts every node restarts "
            "its workers, which resume from checkpoints/latest with --resume_from_checkpoint auto, once all nodes are "
            "back; a node that does not return ends the run after the rendezvous join timeout (torchrun --rdzv_conf "
            "join_timeout=SECONDS)")
