"""CheckpointManager against a real Accelerator (CPU, fp32) and a tiny GPT-2: tiers, retention, hard links,
exact resume, fallback from damaged checkpoints, crash recovery, bad resume specs."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from hf_gpt2_train.checkpoint import CheckpointManager, atomic
from hf_gpt2_train.checkpoint.writer import choose_background_saves
from hf_gpt2_train.config import CheckpointConfig, ConfigError, ModelConfig
from hf_gpt2_train.model import build_model, lm_logits, lm_loss
from hf_gpt2_train.state import TrainerState

TINY = ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=200, pad_vocab_multiple=64)


class Position:
    """A loader-like registered object: its state is the global position, data is a function of it."""

    def __init__(self) -> None:
        self.pos = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + self.pos)
        self.pos += 1
        t = torch.randint(0, TINY.vocab_size, (2, 17), generator=g)
        return t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, d: dict) -> None:
        self.pos = d["pos"]


class Harness:
    """What the trainer does, minus data and logging: model, AdamW, TrainerState + loader state registered."""

    def __init__(self, out: Path, model_cfg: ModelConfig = TINY, **ckpt: object) -> None:
        self.acc = Accelerator(cpu=True)
        model = build_model(model_cfg, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        self.model, self.opt = self.acc.prepare(model, opt)
        self.state, self.loader = TrainerState(), Position()
        self.acc.register_for_checkpointing(self.state)
        self.acc.register_for_checkpointing(self.loader)
        # Asynchronous unless a test says otherwise: the default of GPU runs, and the path with more to get wrong
        # (on CPU the default is synchronous; both write the same files).
        self.cfg = CheckpointConfig(**{"checkpoint_steps": 2, "keep_last": 2, "async_checkpoint": True,
                                       **ckpt})  # type: ignore[arg-type]
        run_info = {"config": {"model": dict(vars(model_cfg))}, "effective_precision": "no"}
        self.mgr = CheckpointManager(self.acc, self.cfg, out, run_info)

    def step(self, **save_kw: object) -> float:
        x, y = self.loader.next_batch()
        loss = lm_loss(lm_logits(self.model, x, TINY.vocab_size), y)
        self.acc.backward(loss)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.tokens_seen += x.numel()
        self.mgr.maybe_save(self.state, **save_kw)  # type: ignore[arg-type]
        return loss.item()

    def steps(self, n: int) -> None:
        """``n`` steps, then wait for the save in flight (saves are asynchronous, as in a GPU run)."""
        for _ in range(n):
            self.step()
        self.mgr.wait()


def names(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


def step_of(folder: Path) -> int:
    return json.loads((folder / "manifest.json").read_text())["step"]


def test_tiers_retention_and_hard_links(tmp_path: Path) -> None:
    h = Harness(tmp_path, keep_last=2, milestone_steps=4)
    val = {3: 5.0, 6: 4.0, 7: 4.5}  # best improves at 3 and 6, not at 7
    for s in range(1, 11):
        h.step(val_loss=val.get(s), epoch_ended=(s == 9), final=(s == 10))
    root = tmp_path / "checkpoints"
    assert names(root) == {"latest", "latest_backup", "best", "final", "milestone_0000004", "milestone_0000008",
                           "milestone_0000009", "step_0000008", "step_0000010"}
    assert [step_of(root / n) for n in ("latest", "latest_backup", "best", "final")] == [10, 8, 6, 10]
    assert h.state.best_val_loss == 4.0
    best_state = torch.load(root / "best" / "custom_checkpoint_0.pkl", weights_only=False)
    assert best_state["best_val_loss"] == 4.0 and best_state["step"] == 6  # updated before it was saved
    # Tiers of one save share inodes: disk use does not multiply.
    ino = {n: (root / n / "optimizer.bin").stat().st_ino for n in ("latest", "step_0000010", "final")}
    assert len(set(ino.values())) == 1
    folders = list(root.iterdir())
    by_save = {json.loads((p / "manifest.json").read_text())["save_id"]: p for p in folders}
    assert len(by_save) == 5  # saves at steps 4, 6, 8, 9, 10 for 9 folders
    expected = sum(atomic.folder_bytes(p) - (p / "manifest.json").stat().st_size for p in by_save.values()) + \
        sum((p / "manifest.json").stat().st_size for p in folders)
    assert atomic.unique_bytes(folders) == expected
    for p in folders:
        v = atomic.verify(p)
        assert v.ok, (p, v.reason)
        saved_as = "latest" if p.name == "latest_backup" else p.name  # a backup is a rotated latest
        assert v.manifest["tier"] == saved_as and v.manifest["config"]["model"]["n_embd"] == TINY.n_embd
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_second_call_at_same_step_links_instead_of_writing(tmp_path: Path) -> None:
    h = Harness(tmp_path, checkpoint_steps=2)
    h.steps(4)
    root = tmp_path / "checkpoints"
    backup_before = (root / "latest_backup" / "model.safetensors").stat().st_ino
    h.mgr.maybe_save(h.state, final=True)  # the trainer's final call at the step it just saved
    assert step_of(root / "latest_backup") == 2, "latest must not rotate onto itself"
    assert (root / "latest_backup" / "model.safetensors").stat().st_ino == backup_before
    assert (root / "final" / "model.safetensors").stat().st_ino == (root / "latest" / "model.safetensors").stat().st_ino


def test_exact_resume_is_bitwise(tmp_path: Path) -> None:
    straight = Harness(tmp_path / "a", checkpoint_steps=3)
    losses = [straight.step() for _ in range(6)]
    first = Harness(tmp_path / "b", checkpoint_steps=3)
    part1 = [first.step() for _ in range(3)]
    first.mgr.wait()
    rng_at_save = torch.get_rng_state()
    torch.manual_seed(999)  # the resumed process starts with other RNG state and fresh weights
    resumed = Harness(tmp_path / "b", checkpoint_steps=3)
    path = resumed.mgr.resolve_resume("latest")
    manifest = resumed.mgr.load(path)
    assert manifest["step"] == 3 and resumed.state.step == 3 and resumed.loader.pos == 3
    assert torch.equal(torch.get_rng_state(), rng_at_save)
    part2 = [resumed.step() for _ in range(3)]
    assert part1 + part2 == losses
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def _damage(kind: str, folder: Path) -> None:
    f = folder / "optimizer.bin"
    if kind == "truncate":
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
    elif kind == "delete":
        f.unlink()
    elif kind == "manifest":
        (folder / "manifest.json").unlink()  # as if killed before the manifest was written


@pytest.mark.parametrize("kind", ["truncate", "delete", "manifest"])
def test_damaged_latest_falls_back_to_backup(tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(tmp_path, checkpoint_steps=2, keep_last=1)
    h.steps(6)
    root = tmp_path / "checkpoints"
    if kind != "manifest":  # the same save's rolling folder shares the damaged inode (truncate) or not (delete)
        shutil.rmtree(root / "step_0000006")
    _damage(kind, root / "latest")
    r = Harness(tmp_path)
    with caplog.at_level(logging.WARNING, logger="hf_gpt2_train.checkpoint"):
        path = r.mgr.resolve_resume("latest")
    assert path == root / "latest_backup"
    assert "skipped latest" in caplog.text and {"truncate": "bytes", "delete": "missing",
                                                "manifest": "did not complete"}[kind] in caplog.text
    assert r.mgr.load(path)["step"] == 4 and r.state.step == 4


def test_same_size_corruption_is_caught_by_checksum_and_falls_back(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(tmp_path, checkpoint_steps=2, keep_last=1)
    h.steps(4)
    root = tmp_path / "checkpoints"
    shutil.rmtree(root / "step_0000004")
    with open(root / "latest" / "model.safetensors", "r+b") as f:  # flip bytes inside a tensor
        f.seek(-64, os.SEEK_END)
        f.write(bytes(64))
    r = Harness(tmp_path)
    path = r.mgr.resolve_resume("latest")
    assert path == root / "latest"  # sizes match: the cheap check passes
    with caplog.at_level(logging.WARNING, logger="hf_gpt2_train.checkpoint"):
        manifest = r.mgr.load(path)
    assert manifest["path"] == str(root / "latest_backup") and r.state.step == 2
    assert "does not match its checksum" in caplog.text and "falling back" in caplog.text
    # With --no_verify_checkpoint the damaged file is loaded (the user asked for no checksums).
    r2 = Harness(tmp_path, verify_checkpoint=False)
    assert r2.mgr.load(r2.mgr.resolve_resume("latest"))["path"] == str(root / "latest")


def test_recover_completes_or_undoes_an_interrupted_rotation(tmp_path: Path) -> None:
    h = Harness(tmp_path, checkpoint_steps=2)
    h.steps(4)
    root = tmp_path / "checkpoints"
    # Crash between the renames of a rotation: latest already moved to latest_backup, the new one still .new-.
    shutil.rmtree(root / "latest_backup")
    os.rename(root / "latest", root / "latest_backup")
    atomic.link_tree(root / "step_0000004", root / ".new-latest", {**atomic.read_manifest(root / "step_0000004"),
                                                                  "tier": "latest"})
    (root / ".tmp-save").mkdir()  # a save that was killed half-way
    (root / ".tmp-save" / "model.safetensors").write_bytes(b"partial")
    r = Harness(tmp_path)
    assert r.mgr.resolve_resume("latest") == root / "latest"
    assert step_of(root / "latest") == 4 and not (root / ".tmp-save").exists() and not (root / ".new-latest").exists()


def test_resume_specs_and_bad_input(tmp_path: Path) -> None:
    h = Harness(tmp_path / "run")
    assert h.mgr.resolve_resume(None) is None and h.mgr.resolve_resume("") is None
    assert h.mgr.resolve_resume("auto") is None  # nothing yet: start fresh
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        h.mgr.resolve_resume("latest")
    with pytest.raises(ConfigError, match="no such checkpoint folder"):
        h.mgr.resolve_resume(str(tmp_path / "nope"))
    h.steps(4)
    with pytest.raises(ConfigError, match="there is no"):
        Harness(tmp_path / "run").mgr.resolve_resume("best")  # no evaluation yet, so no best
    assert Harness(tmp_path / "run").mgr.resolve_resume("auto") == tmp_path / "run" / "checkpoints" / "latest"
    r = Harness(tmp_path / "run")
    assert r.mgr.resolve_resume("backup") == tmp_path / "run" / "checkpoints" / "latest_backup"
    assert r.mgr.resolve_resume("step_0000002") == tmp_path / "run" / "checkpoints" / "step_0000002"
    assert r.mgr.resolve_resume(str(tmp_path / "run")) == tmp_path / "run" / "checkpoints" / "latest"
    other = Harness(tmp_path / "other", model_cfg=ModelConfig(**{**vars(TINY), "n_embd": 64}))
    with pytest.raises(ConfigError, match="n_embd=32 \\(this run: 64\\)"):
        other.mgr.load(other.mgr.resolve_resume(str(tmp_path / "run" / "checkpoints" / "latest")))
    assert not (tmp_path / "other").exists(), "a refused resume writes nothing"


def test_best_only_when_val_loss_improves(tmp_path: Path) -> None:
    h = Harness(tmp_path, checkpoint_steps=0)
    h.step(val_loss=float("nan"))
    h.step(val_loss=2.0)
    h.step(val_loss=2.5)
    h.mgr.wait()
    root = tmp_path / "checkpoints"
    assert names(root) == {"best"} and step_of(root / "best") == 2


def test_resumed_from_checkpoint_is_never_rotated_out(tmp_path: Path) -> None:
    h = Harness(tmp_path, checkpoint_steps=2, keep_last=2)
    h.steps(4)
    root = tmp_path / "checkpoints"
    r = Harness(tmp_path, checkpoint_steps=2, keep_last=1)
    r.mgr.load(r.mgr.resolve_resume("step_0000002"))  # roll back to an earlier rolling checkpoint
    r.steps(6)
    assert (root / "step_0000002").is_dir() and atomic.verify(root / "step_0000002").ok
    rolling = sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))
    assert rolling == ["step_0000002", "step_0000008"]  # keep_last=1 plus the protected resume point


def test_saves_are_written_in_the_background_where_it_pays_unless_the_flag_says_otherwise(tmp_path: Path) -> None:
    """auto: synchronous on CPU (training uses every core), asynchronous on an accelerator (the writer uses the
    host cores the step leaves idle); an explicit flag wins. The reason goes to run_info.json (and the log)."""
    assert choose_background_saves(None, "cpu")[0] is False
    for device in ("cuda", "xpu", "mps"):
        background, reason = choose_background_saves(None, device)
        assert background and reason.startswith(f"asynchronous: the steps run on the {device} device"), reason
    for requested in (True, False):
        assert choose_background_saves(requested, "cpu") == choose_background_saves(requested, "cuda") == (
            requested, f"{'asynchronous' if requested else 'synchronous'} (--async_checkpoint {str(requested).lower()})")
    cpu_default = Harness(tmp_path / "auto", async_checkpoint=None)
    assert cpu_default.mgr.background is False and cpu_default.mgr.run_info["async_checkpoint"] == {
        "enabled": False, "reason": choose_background_saves(None, "cpu")[1]}
    cpu_default.step()
    cpu_default.step()  # step 2 is due: written by the loop, on disk when maybe_save returns
    assert not cpu_default.mgr.writer.busy and atomic.verify(tmp_path / "auto" / "checkpoints" / "latest").ok


def test_background_save_writes_exactly_what_save_state_writes(tmp_path: Path) -> None:
    """The asynchronous save (host copy on the loop's thread, files written by the writer thread) produces the
    files ``accelerator.save_state`` produces for the same state, byte for byte, and they load back."""
    h = Harness(tmp_path / "run", checkpoint_steps=2)
    h.step()
    h.step()  # step 2: saved in the background
    assert h.mgr.writer.busy or (tmp_path / "run" / "checkpoints" / "latest").is_dir()
    h.mgr.wait()
    reference = tmp_path / "save_state"
    h.acc.save_state(str(reference))  # same state, same RNG (nothing ran in between)
    ours = tmp_path / "run" / "checkpoints" / "latest"
    files = {p.name for p in ours.iterdir()} - {"manifest.json"}
    assert files == {p.name for p in reference.iterdir()}
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl",
            "custom_checkpoint_1.pkl"} <= files
    for name in sorted(files):
        assert (ours / name).read_bytes() == (reference / name).read_bytes(), name


def test_a_second_background_save_after_torch_closed_its_stager(tmp_path: Path) -> None:
    """torch 2.11's DefaultStager closes its StateDictStager after every stage(), which empties the table of copiers
    the next stage() needs: on the GPU machine the second asynchronous save failed with KeyError: <class 'type'>.
    Put the stager in that state after the first save (torch 2.13 does not do it itself): the next saves replace it
    and write exactly what ``accelerator.save_state`` writes."""
    h = Harness(tmp_path / "run", checkpoint_steps=1)
    h.step()  # step 1: the first background save creates the stager
    h.mgr.wait()
    stager = h.mgr.capture._stager
    stager._state_dict_stager.close()  # what torch 2.11 does at the end of every stage()
    for _ in range(2):
        h.step()
        h.mgr.wait()
    assert h.mgr.capture._stager is not stager  # replaced once, then reused
    reference = tmp_path / "save_state"
    h.acc.save_state(str(reference))
    ours = tmp_path / "run" / "checkpoints" / "latest"
    assert json.loads((ours / "manifest.json").read_text())["step"] == 3
    for name in ("model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl"):
        assert (ours / name).read_bytes() == (reference / name).read_bytes(), name


def test_stop_save_with_a_write_in_flight_waits_for_it_and_is_durable(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """What the trainer does on SIGTERM: a save at the next step boundary with ``force_latest`` while the previous
    save is still being written in the background. It waits for that write, then saves durably: both verify."""
    h = Harness(tmp_path, checkpoint_steps=2)
    h.step()
    h.step()  # step 2: written in the background
    in_flight = h.mgr.writer.busy and h.mgr.writer._thread is not None and h.mgr.writer._thread.is_alive()
    h.state.step += 1  # the next step boundary (no training in between: the write is surely still going)
    with caplog.at_level(logging.INFO, logger="hf_gpt2_train.checkpoint"):
        h.mgr.maybe_save(h.state, force_latest=True)
    assert in_flight, "the step-2 write had already finished: nothing was in flight"
    assert "finishing the background write of the checkpoint of step 2 first" in caplog.text
    assert not h.mgr.writer.busy  # nothing left in flight when maybe_save returns
    root = tmp_path / "checkpoints"
    for name, step in (("latest", 3), ("latest_backup", 2), ("step_0000002", 2)):
        v = atomic.verify(root / name, hashes=True)
        assert v.ok and v.manifest["step"] == step, (name, v.reason)


def test_background_save_holds_the_state_of_its_step_while_training_goes_on(tmp_path: Path) -> None:
    """The host copy overlaps what follows the save; the optimizer step right after it waits for the copy, so
    what is written is the state at the save, not a later one. (A 50k-row embedding makes the copy take
    milliseconds, while the step is issued microseconds after the save returns.)"""
    from safetensors.torch import load_file

    h = Harness(tmp_path, ModelConfig(**{**vars(TINY), "vocab_size": 50257, "n_embd": 64}), checkpoint_steps=2)
    h.step()
    h.cfg.checkpoint_steps = 0
    h.step()  # step 2, not saved yet: keep a copy of the truth, then save as the trainer does
    weights = {k: v.clone() for k, v in h.model.state_dict().items()}
    moments = {i: {k: v.clone() for k, v in st.items()} for i, st in enumerate(h.opt.optimizer.state.values())}
    for p in h.model.parameters():
        p.grad = torch.ones_like(p)
    h.cfg.checkpoint_steps = 2
    h.mgr.maybe_save(h.state)  # copy and write start in the background
    h.opt.step()  # changes every weight and moment in place, at once
    h.mgr.wait()
    saved = load_file(tmp_path / "checkpoints" / "step_0000002" / "model.safetensors")
    assert saved.keys() <= weights.keys() and all(torch.equal(saved[k], weights[k]) for k in saved)
    assert not torch.equal(h.model.state_dict()["transformer.wte.weight"], weights["transformer.wte.weight"])
    opt_state = torch.load(tmp_path / "checkpoints" / "step_0000002" / "optimizer.bin", weights_only=True)["state"]
    assert all(torch.equal(opt_state[i][k], moments[i][k]) for i in moments for k in moments[i])
