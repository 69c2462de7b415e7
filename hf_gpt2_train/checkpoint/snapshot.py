"""What one save captures on the training loop's thread, and how the writer thread turns it into files.

The files are exactly what ``accelerator.save_state`` writes and ``accelerator.load_state`` reads, written by
Accelerate's own writers (``save_accelerator_state``, ``save_custom_state``, ``accelerate.utils.save``):

* ``capture`` (loop thread, every rank, between two optimizer steps) writes the small state-dependent files at
  once - ``random_states_<rank>.pkl`` (every rank, with the RNG states and ``accelerator.step`` of this moment),
  ``custom_checkpoint_<i>.pkl`` (``TrainerState``, the loader position), ``scaler.pt`` - and starts copying the
  model and optimizer state into host buffers (torch DCP's ``DefaultStager``: its own thread, and its own CUDA
  stream with pinned memory on GPU; buffers reused from save to save; tensor aliasing such as GPT-2's tied
  embedding preserved). The copy overlaps the next step's forward and backward, which only read the weights:
  an optimizer step pre-hook makes the next ``optimizer.step()`` wait until the copy is complete, so the
  copy is always of the state at the save. A synchronous save skips the copy.
* ``write`` (writer thread) serialises those copies: ``model.safetensors`` (tied weights dropped, as
  ``save_state`` does) and ``optimizer.bin``, with ``direct.py``: the same bytes as Accelerate's ``save``, written
  with direct I/O (no page cache) and checksummed on the way out (``Snapshot.entries``, used by ``atomic.seal``).

FSDP2 (``distributed_type == FSDP``, ``fsdp_version 2``) adds Accelerate's native FSDP files, so FSDP resumes with
``load_state`` as usual, and always writes the *consolidated* ``model.safetensors`` (full weights, training
layout) and a full ``optimizer.bin`` keyed by parameter name (``torch.optim.Optimizer.load_state_dict`` maps
saved to current parameters by position, so it loads without FSDP): export, eval, push and DDP/single-process
resume read those.

* ``FULL_STATE_DICT``: the full state is all-gathered to rank 0's CPU on the loop thread (a collective);
  rank 0 writes ``pytorch_model_fsdp.bin`` (as ``save_fsdp_model`` does), ``optimizer.bin`` (as
  ``save_fsdp_optimizer`` does: it is already the full, name-keyed state) and ``model.safetensors``. Cost: one
  extra copy of the weights on disk per checkpoint.
* ``SHARDED_STATE_DICT``: each rank copies its shards to host memory; every rank's writer thread saves them with
  DCP into ``pytorch_model_fsdp_0/`` and ``optimizer_0/`` over a gloo group of its own (no collective ever runs
  on the training group from a background thread); rank 0 then merges the shards from disk into
  ``model.safetensors`` + ``optimizer.bin``. Cost: a second, full copy of the state on disk per checkpoint, and
  rank 0 reads the shards back once.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("hf_gpt2_train.checkpoint")

FSDP_FULL, FSDP_SHARDED = "full", "sharded"


def fsdp_mode(accelerator: Any) -> str | None:
    """None (no FSDP), ``"full"`` or ``"sharded"`` (FSDP2 with that state dict type)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    plugin = accelerator.state.fsdp_plugin
    if getattr(plugin, "fsdp_version", 1) != 2:
        return "fsdp1"
    kind = getattr(plugin.state_dict_type, "name", str(plugin.state_dict_type))
    return FSDP_FULL if "FULL" in kind else FSDP_SHARDED


def _spent(stager: Any) -> bool:
    """Whether a ``DefaultStager`` can no longer stage: torch 2.11's closes its ``StateDictStager`` after every
    ``stage()``, which empties the copier table the next ``stage()`` needs (the second asynchronous save on a GPU
    failed with ``KeyError: <class 'type'>``). A spent stager is replaced by a new one (its pinned buffers are
    gone with the close anyway); where torch keeps the table (2.13) the stager and its buffers are reused."""
    table = getattr(getattr(stager, "_state_dict_stager", None), "_deepcopy_dispatch", None)
    return isinstance(table, dict) and not table


def fsdp_resume_problem(folder: Path, mode: str | None) -> str | None:
    """Why ``folder`` cannot be loaded by ``load_state`` under this FSDP mode (None: it can)."""
    if mode == FSDP_FULL and not (folder / "pytorch_model_fsdp.bin").is_file():
        return "it holds no full FSDP state (pytorch_model_fsdp.bin)"
    if mode == FSDP_SHARDED and not (folder / "pytorch_model_fsdp_0").is_dir():
        return "it holds no sharded FSDP state (pytorch_model_fsdp_0/)"
    return None


@dataclass
class Snapshot:
    """The state of one save, held in memory until the writer thread has written it."""

    folder: Path
    models: list[dict[str, Any]] = field(default_factory=list)  # main process: training-layout state dicts
    optimizers: list[dict[str, Any]] = field(default_factory=list)
    fsdp_native: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (file, state) FSDP full
    sharded: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (DCP folder, state) every rank
    tied: list[list[str]] = field(default_factory=list)  # state dict keys that name one parameter
    staged: Future | None = None  # the host copy being made ({"models", "optimizers"} or {"model", "optimizer"})
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)  # manifest entries of the files written directly


class StateCapture:
    """Captures (loop thread) and writes (writer thread) the state of ``accelerator``'s model and optimizer."""

    def __init__(self, accelerator: Any):
        self.acc = accelerator
        self.mode = fsdp_mode(accelerator)
        self.is_main = bool(accelerator.is_main_process)
        self._stager: Any = None
        self._staging: Future | None = None  # the copy the next optimizer step must wait for
        self._hooked: set[int] = set()
        self.stage_wait_s = 0.0  # how long the last optimizer step waited for a copy to finish
        self._group: Any = None  # gloo group of the writer threads (FSDP sharded only)

    @property
    def writes_on_every_rank(self) -> bool:
        """FSDP sharded: every rank's writer thread has shards to write (and takes part in DCP's collectives)."""
        return self.mode == FSDP_SHARDED

    def capture(self, folder: Path, copy: bool) -> Snapshot:
        """Write the small files into ``folder`` and take the model/optimizer state (a copy when ``copy``)."""
        from accelerate.checkpointing import save_accelerator_state, save_custom_state

        acc = self.acc
        if self.mode == "fsdp1":  # not supported by the asynchronous path: Accelerate's synchronous save
            acc.save_state(str(folder))
            return Snapshot(folder)
        each_node = acc.project_configuration.save_on_each_node
        save_accelerator_state(str(folder), [], [], acc._schedulers, acc._dataloaders, acc.state.process_index,
                               acc.step, acc.scaler if self.is_main else None, save_on_each_node=each_node)
        for i, obj in enumerate(acc._custom_objects):
            save_custom_state(obj, str(folder), i, save_on_each_node=each_node)
        snap = Snapshot(folder, tied=_tied_names(acc.unwrap_model(acc._models[0])) if acc._models else [])
        if self.mode == FSDP_FULL:
            self._capture_fsdp_full(snap)
        elif self.mode == FSDP_SHARDED:
            self._capture_fsdp_sharded(snap, copy)
        elif self.is_main:
            weights = [acc.get_state_dict(m, unwrap=False) for m in acc._models]
            for hook in acc._save_model_state_pre_hook.values():  # as save_state calls them
                hook(acc._models, weights, str(folder))
            optimizers = [o.state_dict() for o in acc._optimizers]
            if copy:
                snap.staged = self._stage({"models": weights, "optimizers": optimizers})
            else:
                snap.models, snap.optimizers = weights, optimizers
        return snap

    def write(self, snap: Snapshot) -> None:
        """Serialise a snapshot into its folder (writer thread; every rank in FSDP sharded mode, else main)."""
        from hf_gpt2_train.checkpoint.direct import save_safetensors, save_torch

        folder = snap.folder
        if snap.staged is not None:  # the host copy (complete by now unless no optimizer step ran since)
            staged = snap.staged.result()
            if self.mode == FSDP_SHARDED:
                snap.sharded = [("pytorch_model_fsdp_0", {"model": staged["model"]}),
                                ("optimizer_0", {"optimizer": staged["optimizer"]})]
            else:
                snap.models, snap.optimizers = staged["models"], staged["optimizers"]
        for sub, state in snap.sharded:  # every rank its shards, DCP collectives on the writer group only
            import torch.distributed.checkpoint as dcp

            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder / sub)), process_group=self._group)
        if not self.is_main:
            return
        if snap.sharded:
            snap.models, snap.optimizers = _merge_shards(folder)
        for name, state in snap.fsdp_native:
            snap.entries[name] = save_torch(state, folder / name)
        for i, state in enumerate(snap.models):
            if snap.tied and self.mode is not None:
                state = _drop_tied(state, snap.tied)
            name = "model.safetensors" if i == 0 else f"model_{i}.safetensors"
            snap.entries[name] = save_safetensors(state, folder / name)
        for i, state in enumerate(snap.optimizers):
            name = "optimizer.bin" if i == 0 else f"optimizer_{i}.bin"
            snap.entries[name] = save_torch(state, folder / name)

    # ------------------------------------------------------------------------------------------- internals
    def _stage(self, obj: Any) -> Future:
        """Start copying ``obj``'s tensors to host memory in the stager's thread; the next optimizer step waits."""
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        cuda = self.acc.device.type == "cuda"
        if self._stager is not None and _spent(self._stager):
            self._stager.close()  # its last copy is complete: the writer of the previous save has consumed it
            self._stager = None
        if self._stager is None:
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                        use_async_staging=True, use_non_blocking_copy=cuda))
        for opt in self.acc._optimizers:
            inner = getattr(opt, "optimizer", opt)
            if id(inner) not in self._hooked:
                inner.register_step_pre_hook(self._wait_for_staging)
                self._hooked.add(id(inner))
        if cuda:  # the copy runs on the stager's stream: the optimizer step queued before it must be done
            torch.cuda.current_stream().synchronize()
        self.stage_wait_s = 0.0
        self._staging = self._stager.stage(obj)
        return self._staging

    def _wait_for_staging(self, *_: Any) -> None:
        """Optimizer step pre-hook: the weights and moments may change only once their copy is complete."""
        fut, self._staging = self._staging, None
        if fut is None:
            return
        t0 = time.perf_counter()
        try:
            fut.result()
        except Exception:  # reported by the writer thread (``write``), as a failed save
            pass
        self.stage_wait_s = time.perf_counter() - t0

    def _capture_fsdp_full(self, snap: Snapshot) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        acc = self.acc
        model, optimizer = acc._models[0], acc._optimizers[0]
        msd = get_model_state_dict(model, options=opts)
        osd = get_optimizer_state_dict(model, optimizer, options=opts)
        if self.is_main:
            # Gathered tensors are fresh copies; anything not sharded (a step counter) may still be the live
            # tensor the next optimizer step changes in place: copy those.
            live = _live_storages(model, optimizer)
            msd, osd = _detach(msd, live), _detach(osd, live)
            snap.fsdp_native = [("pytorch_model_fsdp.bin", msd)]
            snap.models, snap.optimizers = [OrderedDict(msd)], [osd]

    def _capture_fsdp_sharded(self, snap: Snapshot, copy: bool) -> None:
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        if self._group is None:
            self._group = dist.new_group(backend="gloo")  # a collective: every rank reaches the first save
        acc = self.acc
        model, optimizer = acc._models[0], acc._optimizers[0]
        opts = StateDictOptions(full_state_dict=False)
        state = {"model": get_model_state_dict(model, options=opts),
                 "optimizer": get_optimizer_state_dict(model, optimizer, options=opts)}
        if copy:
            snap.staged = self._stage(state)
        else:
            snap.sharded = [("pytorch_model_fsdp_0", {"model": state["model"]}),
                            ("optimizer_0", {"optimizer": state["optimizer"]})]


def _tied_names(model: torch.nn.Module) -> list[list[str]]:
    """Groups of state dict keys that are one parameter (GPT-2: the embedding and lm_head)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _drop_tied(state: dict[str, Any], tied: list[list[str]]) -> OrderedDict:
    """A gathered FSDP state dict holds tied weights twice; keep the first name, as ``save_state`` does."""
    drop = {n for names in tied for n in names[1:]}
    return OrderedDict((k, v) for k, v in state.items() if k not in drop)


def _live_storages(model: torch.nn.Module, optimizer: Any) -> set[int]:
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    ptrs = {local(p).untyped_storage().data_ptr() for p in model.parameters()}
    for st in optimizer.state.values():
        ptrs |= {local(v).untyped_storage().data_ptr() for v in st.values() if isinstance(v, torch.Tensor)}
    return ptrs


def _detach(obj: Any, live: set[int]) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj.untyped_storage().data_ptr() in live else obj
    if isinstance(obj, dict):
        return type(obj)((k, _detach(v, live)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_detach(v, live) for v in obj]
    return obj


def _merge_shards(folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Full model and optimizer state from the DCP shards in ``folder`` (read back without a process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    out = []
    for sub, key in (("pytorch_model_fsdp_0", "model"), ("optimizer_0", "optimizer")):
        sd: dict[str, Any] = {}
        _load_state_dict(sd, storage_reader=dcp.FileSystemReader(str(folder / sub)),
                         planner=_EmptyStateDictLoadPlanner(), no_dist=True)
        out.append(sd[key])
    return [OrderedDict(out[0])], [out[1]]
