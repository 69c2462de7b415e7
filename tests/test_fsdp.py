"""FSDP2 through the real Trainer on 2 gloo processes (``tests/fsdp_harness.py`` forces Accelerate's FSDP2 path on
for CPU processes): it trains, saves FULL and SHARDED checkpoints that verify, resumes under FSDP exactly and
under DDP, and its checkpoints export to a model transformers loads.

Both runs use the small configuration of tests/test_checkpoint_e2e.py (8 steps, a save every 2 steps and a
milestone at step 4), asynchronous saves (the default).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_gpt2_train.checkpoint import atomic
from tests.test_checkpoint_e2e import losses, manifest, train_args

pytestmark = pytest.mark.slow
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], state_dict_type: str | None, log: Path) -> subprocess.CompletedProcess:
    """2 processes: under FSDP2 through the harness (``state_dict_type``), or plain DDP (None)."""
    module = "tests.fsdp_harness" if state_dict_type else "hf_gpt2_train"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    if state_dict_type:
        env["FSDP_STATE_DICT_TYPE"] = state_dict_type
    proc = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", module,
                           *args], capture_output=True, text=True, env=env, timeout=900)
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not Path(TORCHRUN).exists():
        pytest.skip("torchrun not installed")
    base = tmp_path_factory.mktemp("fsdp")
    out = {"full": base / "full", "sharded": base / "sharded"}
    for kind, name in (("FULL_STATE_DICT", "full"), ("SHARDED_STATE_DICT", "sharded")):
        torchrun(train_args(out[name]), kind, base / f"{name}.log")
    return out


def test_fsdp_trains_and_saves_full_and_sharded_checkpoints(runs: dict[str, Path]) -> None:
    full, sharded = losses(runs["full"]), losses(runs["sharded"])
    assert sorted(full) == list(range(1, 9)) and full == sharded  # the state dict type changes saving only
    assert full[8] < full[1]
    native = {"full": {"pytorch_model_fsdp.bin", "optimizer.bin"},
              "sharded": {"pytorch_model_fsdp_0/.metadata", "optimizer_0/.metadata", "optimizer.bin"}}
    for name, out in runs.items():
        root = out / "checkpoints"
        for tier in ("latest", "latest_backup", "milestone_0000004", "final", "best"):
            v = atomic.verify(root / tier, hashes=True)
            assert v.ok, (name, tier, v.reason)
            assert v.manifest["world_size"] == 2
            assert native[name] | {"model.safetensors", "random_states_0.pkl", "random_states_1.pkl",
                                   "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"} <= set(v.manifest["files"])
    from safetensors.torch import load_file

    a, b = (load_file(runs[n] / "checkpoints" / "final" / "model.safetensors") for n in ("full", "sharded"))
    assert a.keys() == b.keys() and "lm_head.weight" not in a  # tied to the embedding, stored once
    assert all(torch.equal(a[k], b[k]) for k in a)  # consolidated weights, gathered vs merged from shards


def test_sharded_fsdp_checkpoint_resumes_under_fsdp_exactly(runs: dict[str, Path], tmp_path: Path) -> None:
    """The resumed run checkpoints every block's activations (``full``, inside FSDP2's per-block units):
    recomputation gives the same numbers, so the losses stay bitwise those of the run without it."""
    out = tmp_path / "run"
    shutil.copytree(runs["sharded"], out, copy_function=os.link)
    torchrun(train_args(out, resume_from_checkpoint="milestone_0000004", activation_checkpointing="full"),
             "SHARDED_STATE_DICT", tmp_path / "r.log")
    assert "resumed from" in (tmp_path / "r.log").read_text()
    assert losses(out) == losses(runs["sharded"])  # steps 5-8 again, bit for bit
    assert manifest(out / "checkpoints" / "final")["step"] == 8
    assert manifest(out / "checkpoints" / "final")["config"]["run"]["activation_checkpointing"] == "full"


def test_full_fsdp_checkpoint_resumes_under_ddp(runs: dict[str, Path], tmp_path: Path) -> None:
    """DDP reads the consolidated model.safetensors and the name-keyed full optimizer.bin of an FSDP checkpoint.
    Same math as FSDP, other reduction order: equal to float32 rounding. The DDP run uses selective activation
    checkpointing (DDP's gradient hooks fire on the recomputed backward as on the plain one)."""
    out = tmp_path / "run"
    shutil.copytree(runs["full"], out, copy_function=os.link)
    torchrun(train_args(out, resume_from_checkpoint="milestone_0000004", activation_checkpointing="selective"), None,
             tmp_path / "r.log")
    ours, ref = losses(out), losses(runs["full"])
    assert ours.keys() == ref.keys() and all(abs(ours[s] - ref[s]) <= 1e-5 * abs(ref[s]) for s in ref), (ours, ref)
    assert manifest(out / "checkpoints" / "final")["world_size"] == 2


def test_fsdp_checkpoints_export_and_load_like_any_checkpoint(runs: dict[str, Path], tmp_path: Path,
                                                             shared_data: Path) -> None:
    from transformers import AutoModelForCausalLM

    from hf_gpt2_train.hub.export import export_hf
    from hf_gpt2_train.model import load_trained_model

    for name, out in runs.items():
        ckpt = out / "checkpoints" / "final"
        ours, mcfg = load_trained_model(str(ckpt))  # what eval uses
        export = export_hf(ckpt, tmp_path / f"{name}-hf", tokenizer_file=str(shared_data / "gpt2.tiktoken"))
        hf = AutoModelForCausalLM.from_pretrained(str(export)).eval()
        assert hf.config.vocab_size == 50257 and hf.config.n_embd == mcfg.n_embd == 32
        x = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got, want = hf(x).logits, ours(x).logits[..., :50257]
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
