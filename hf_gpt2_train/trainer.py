"""The training loop: ``Trainer.train()`` composes the components, ``Trainer.train_step()`` is one step.

Each component decides when it runs: the tracker logs every ``logging_steps``, the evaluator every
``eval_steps``, the checkpoint manager saves the tiers that are due. Only logging steps synchronise the
host with the device (loss, grad norm and the update guard's records stay on the device otherwise).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, set_seed
from torch.distributed.tensor import DTensor

from hf_gpt2_train import package_versions
from hf_gpt2_train.activation_checkpointing import apply_activation_checkpointing
from hf_gpt2_train.config import Config, ConfigError
from hf_gpt2_train.fsio import write_json_atomic
from hf_gpt2_train.memory import resolve_micro_batch, resumed_micro_batch
from hf_gpt2_train.model import build_model, flops_per_token, setup_training_forward
from hf_gpt2_train.optim import build_optimizer, schedule_change, set_lr, start_decay_now
from hf_gpt2_train.outdir import check_output_dir
from hf_gpt2_train.redact import install_log_redaction
from hf_gpt2_train.state import TrainerState
from hf_gpt2_train.tracking import StepTimer, Tracker, hardware, log, log_with, setup_logging


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.output_dir = Path(cfg.run.output_dir)
        from hf_gpt2_train.resilience import Resilience, collective_kwargs

        # The process group is created here, first: its collective timeout must be set now (resilience).
        self.pg_kwargs = collective_kwargs(cfg.resilience)
        dist = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"),
                            **self.pg_kwargs.to_kwargs())
        micro_batch_note = cfg.fit_micro_batch(dist.num_processes)  # presets run on any number of processes
        cfg.validate(world_size=dist.num_processes)
        auto_micro_batch = cfg.optim.per_device_train_batch_size == "auto"
        if auto_micro_batch:  # provisional: resolved on the prepared model below (memory.resolve_micro_batch)
            cfg.optim.per_device_train_batch_size = 1

        from hf_gpt2_train.checkpoint import CheckpointManager, GracefulShutdown
        from hf_gpt2_train.data.loader import TrainLoader, resolve_data_dir, val_batches
        from hf_gpt2_train.data.tokenizer import get_encoding
        from hf_gpt2_train.evaluate import Evaluator
        from hf_gpt2_train.hub.mirror import HubMirror
        from hf_gpt2_train.mfu import peak_tflops
        from hf_gpt2_train.precision import (
            describe,
            fp8_coverage,
            plan_precision,
            precision_info,
            prepare_model_for_precision,
        )

        data_dir = resolve_data_dir(cfg.data, dist)  # every shard checked, before any output is written
        self.enc = get_encoding(cfg.data.tokenizer_file)
        check_output_dir(self.output_dir, cfg.checkpoint.resume_from_checkpoint, dist)  # a file, read-only, a run

        self.plan = plan_precision(cfg.precision, dist.device.type)
        self.accum = cfg.grad_accum_steps(dist.num_processes)
        accelerator_kwargs = self.plan.accelerator_kwargs()
        accelerator_kwargs["kwargs_handlers"] = [*accelerator_kwargs["kwargs_handlers"], self.pg_kwargs]
        self.accelerator = Accelerator(
            **accelerator_kwargs,
            gradient_accumulation_steps=self.accum,
            log_with=log_with(cfg.tracking.report_to),
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / "runs")),
            step_scheduler_with_optimizer=False,
            # We compile per GPT2Block ourselves (setup_training_forward); Accelerate's whole-model compile, which
            # an accelerate config's dynamo_backend would turn on, runs SDPA with a mask and no flash kernel.
            dynamo_backend="no",
        )
        acc = self.accelerator
        # The manager holds run_info by reference (filled below) and resolves the resume request before
        # anything is written, so a bad --resume_from_checkpoint leaves the output folder untouched.
        self.run_info: dict[str, Any] = {"config": cfg.to_dict(redact=True)}  # what is written/logged: no tokens
        self.mirror = HubMirror(cfg, self.output_dir, acc.is_main_process)  # --hub_strategy uploads, resume from hub
        self.checkpoints = CheckpointManager(acc, cfg.checkpoint, self.output_dir, self.run_info, hub=self.mirror)
        self.resume_path = self.checkpoints.resolve_resume(cfg.checkpoint.resume_from_checkpoint)
        if cfg.optim.decay_now and self.resume_path is None:
            raise ConfigError("--decay_now: there is no checkpoint to cool down from in "
                              f"{self.output_dir / 'checkpoints'}: pass the run's --output_dir", every_process=True)
        setup_logging(self.output_dir, acc.is_main_process)
        install_log_redaction(log)
        if micro_batch_note:
            log.info(micro_batch_note)
        for w in self.plan.warnings:
            log.warning(w)
        log.info("checkpoint saves: %s", self.checkpoints.save_mode)
        if acc.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        set_seed(cfg.run.seed)  # same init on every rank
        model = prepare_model_for_precision(build_model(cfg.model), self.plan, cfg.precision)
        # Checkpointing first, then the per-block compile, then DDP/FSDP wrapping (torchtitan's order).
        if ac_warning := apply_activation_checkpointing(model, cfg.run.activation_checkpointing,
                                                        cfg.run.activation_checkpointing_every,
                                                        transformer_engine=self.plan.fp8_backend == "te"):
            log.warning(ac_warning)
        config_dynamo = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()  # `accelerate config` asked
        use_compile = cfg.run.compile if cfg.run.compile is not None else (
            acc.device.type == "cuda" or config_dynamo not in ("", "no"))
        if config_dynamo not in ("", "no"):
            log.info("the accelerate config's dynamo_backend %s: compiling each GPT2Block instead of the whole "
                     "model (--compile %s)", config_dynamo, str(use_compile).lower())
        # In place, before prepare (DDP/FSDP wrap the compiled blocks); eval runs the same modules eagerly.
        setup_training_forward(model, use_compile, cfg.run.padded_logits, self.plan.compile_blocks)
        optimizer = build_optimizer(model, cfg, acc.device)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        if auto_micro_batch:  # tried on the prepared model; a resume keeps its checkpoint's micro-batch
            self.run_info["micro_batch"] = resolve_micro_batch(cfg, acc, self.model, self.optimizer,
                                                               resumed_micro_batch(self.resume_path))
            self.run_info["config"] = cfg.to_dict(redact=True)
            self.accum = acc.gradient_accumulation_steps = cfg.grad_accum_steps(acc.num_processes)

        self.state = TrainerState()
        o = cfg.optim
        self.train_loader = TrainLoader(data_dir, o.seq_len, o.per_device_train_batch_size, acc.process_index,
                                        acc.num_processes, cfg.run.seed, cfg.data.shuffle,
                                        pin_memory=acc.device.type == "cuda",
                                        other_data_ok=cfg.data.resume_on_other_data)
        acc.register_for_checkpointing(self.state)  # custom_checkpoint_0
        acc.register_for_checkpointing(self.train_loader)  # custom_checkpoint_1
        self.val_batches = val_batches(data_dir, o.seq_len, o.per_device_train_batch_size, cfg.data.val_batches,
                                       acc.process_index, acc.num_processes)

        coverage = fp8_coverage(acc.unwrap_model(self.model), cfg.model, self.plan, o.seq_len)
        self.precision_line = describe(self.plan, coverage)
        self.run_info.update({
            **precision_info(self.plan, coverage),
            "world_size": acc.num_processes, "grad_accum_steps": self.accum, "compile": use_compile,
            **dict(zip(("device", "hardware"), hardware(acc.device.type, acc.num_processes), strict=True)),
            "data_dir": str(data_dir), "versions": package_versions(),
        })
        self.shutdown = GracefulShutdown()
        self.evaluator = Evaluator(cfg, acc, self.model, self.val_batches, self.enc)
        self.flops_per_token = flops_per_token(cfg.model, o.seq_len)
        peak = peak_tflops(self.plan.effective, self.run_info["device"], cfg.run.device_peak_tflops)
        self.peak_flops = (peak or 0.0) * 1e12  # unknown device: no MFU rather than a made-up one
        self.resilience = Resilience(cfg, acc, self.state, self.train_loader, self.checkpoints, self.output_dir)

    # ---------------------------------------------------------------------------------------- one step
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step over grad_accum micro-batches. Returns (loss, grad_norm) on device, and the lr."""
        acc, model, opt = self.accelerator, self.model, self.optimizer
        lr = set_lr(opt, self.state.step, self.cfg)  # every param group (Muon's its own); AdamW's lr is logged
        loss_sum = torch.zeros((), device=acc.device)
        first_sequence = self.train_loader.position
        for _ in range(self.accum):
            x, y = (t.to(acc.device, non_blocking=True) for t in self.train_loader.next_batch())  # pinned on CUDA
            with acc.accumulate(model):  # no gradient all-reduce on non-final micro-steps
                loss = model(input_ids=x, targets=y)  # the mean loss; the logits stay in the compiled region
                acc.backward(loss)  # Accelerate divides by the accumulation steps
                loss_sum += loss.detach()
        loss = loss_sum / self.accum
        max_norm = self.cfg.optim.max_grad_norm or math.inf
        grad_norm = acc.clip_grad_norm_(model.parameters(), max_norm)
        if isinstance(grad_norm, DTensor):  # FSDP2: a replicated DTensor; no communication to materialise it
            grad_norm = grad_norm.full_tensor()
        # A non-finite or outlier step is skipped on the device by the fused optimizer (no host sync).
        guard = self.resilience.guard
        skip = guard.check(loss, grad_norm, self.state.step + 1, (first_sequence, self.train_loader.position),
                           guard.scaler_overflow(acc.scaler, opt))
        with guard.applied_to(opt, skip, acc.scaler):
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss, grad_norm, lr

    # ------------------------------------------------------------------------------------------ the loop
    def train(self) -> int:
        cfg, acc, state = self.cfg, self.accelerator, self.state
        resume = self.resume_path
        if resume is not None:  # load() logs what it loaded (it may fall back past a damaged checkpoint)
            manifest = self.checkpoints.load(resume)
            resume = Path(manifest["path"])
            if cfg.optim.decay_now:  # the new max_steps is part of the config every later checkpoint records
                log.info(start_decay_now(manifest.get("config"), cfg, state.step))
                self.run_info["config"] = cfg.to_dict(redact=True)
            if change := schedule_change(manifest.get("config"), cfg, state.step):
                (log.warning if change.warning else log.info)(change.message)
        self.run_info["resumed_from"] = str(resume) if resume else None
        if acc.is_main_process:
            write_json_atomic(self.output_dir / "run_info.json", self.run_info, indent=2)
        log.info("%s; %d process(es), %d accumulation step(s), %s tokens/step", self.precision_line,
                 acc.num_processes, self.accum, f"{cfg.optim.total_batch_size:,}")
        tracker = Tracker(acc, self.output_dir, cfg.run.run_name, self.run_info, state.step, cfg.optim.max_steps,
                          state.tokens_seen, cfg.optim.total_batch_size)
        timer, started, wall0 = tracker.timer, time.time(), state.wall_time
        stopped_by_signal = False
        with self.shutdown, tracker.bar_closed_on_error(), self.resilience.watchdog:
            while state.step < cfg.optim.max_steps:
                loss, grad_norm, lr = self.train_step()
                state.step += 1
                state.tokens_seen += cfg.optim.total_batch_size
                state.wall_time = wall0 + time.time() - started
                epoch_ended, state.epoch = self.train_loader.epoch != state.epoch, self.train_loader.epoch
                final = state.step == cfg.optim.max_steps
                tracker.advance()
                if state.step % cfg.tracking.logging_steps == 0 or final:
                    self._log_train(tracker, timer, loss, grad_norm, lr)
                    if self.resilience.maybe_roll_back(tracker):  # a spike: continue from an earlier checkpoint
                        timer.restart(state.step)
                        continue
                val_loss = None
                if self.evaluator.due(state.step, final):
                    with timer.paused("eval"):  # eval and save time stay out of tokens/s, MFU and ETA
                        metrics, samples = self.evaluator.run(state.step)
                    tracker.log_eval(state.step, metrics, samples)
                    val_loss = state.last_val_loss = metrics.get("eval/val_loss")
                    state.last_val_step = state.step
                stopped_by_signal = self.shutdown.should_stop()
                with timer.paused("checkpoint"):
                    saved = self.checkpoints.maybe_save(state, val_loss=val_loss, epoch_ended=epoch_ended,
                                                        final=final, force_latest=stopped_by_signal)
                if saved is not None:
                    tracker.log_checkpoint(state.step)
                if stopped_by_signal:
                    break
                self.resilience.watchdog.beat(state.step)
        tracker.finish()
        if stopped_by_signal:
            from hf_gpt2_train.checkpoint import resume_command_hint

            log.warning("stopped by signal at step %d; saved 'latest'. Resume with:\n  %s", state.step,
                        resume_command_hint(self.output_dir))
        acc.wait_for_everyone()  # the last collective: every rank is done with the final checkpoint
        # Main: mirror uploads in flight end before the end push (the others wait in push_at_end's long barrier).
        self.mirror.finish(wait=not stopped_by_signal)
        code = 0
        if not stopped_by_signal and cfg.hub.push_to_hub:
            from hf_gpt2_train.hub import push_at_end

            # Training is done and checkpointed; a failed push only changes the exit code (1).
            code = 0 if push_at_end(acc, self.output_dir, cfg) else 1
        acc.end_training()  # closes the trackers and destroys the process group: nothing distributed after it
        return code

    def _log_train(self, tracker: Tracker, timer: StepTimer, loss, grad_norm, lr: float) -> None:
        """The only place the loop waits for the device: reduce, read, check the guard's records, log."""
        cfg, acc, state = self.cfg, self.accelerator, self.state
        loss_mean = acc.reduce(loss.detach().clone(), reduction="mean").item()
        guard_metrics = self.resilience.collect()  # raises NonFiniteLossError with --on_nonfinite stop
        step_time, _ = timer.lap(state.step)
        tok_s = cfg.optim.total_batch_size / step_time
        metrics = {
            "train/loss": loss_mean, "train/lr": lr, "train/grad_norm": float(grad_norm),
            "perf/tokens_per_sec": tok_s, "perf/step_time_ms": 1000 * step_time,
            "time/elapsed_hours": state.wall_time / 3600,
            "time/eta_hours": (cfg.optim.max_steps - state.step) * (step_time + timer.overhead_per_step(state.step))
            / 3600, **guard_metrics,
        }
        if self.peak_flops:
            metrics["perf/mfu"] = self.flops_per_token * tok_s / (self.peak_flops * acc.num_processes)
        if acc.device.type == "cuda":
            metrics["perf/peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        tracker.log_train(state.step, metrics)


def train(cfg: Config) -> int:
    return Trainer(cfg).train()

