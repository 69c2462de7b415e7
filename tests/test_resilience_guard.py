"""The update guard, the loader's skipped ranges and the hang watchdog as units (fast, CPU, no training run).

The fp16 path uses a real ``torch.amp.GradScaler`` on the CPU with a real fused AdamW: Accelerate creates
no scaler on CPU, so this is the one place the scaler path can run here (the trainer-level fp16 test in
test_resilience_fp16.py attaches the same scaler to a real Trainer).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hf_gpt2_train.config import ConfigError, ResilienceConfig, build_config
from hf_gpt2_train.errors import EXIT_HANG, NonFiniteLossError
from hf_gpt2_train.resilience.guard import INSTABILITY, LOSS_OUTLIER, NONFINITE, SCALER_OVERFLOW, UpdateGuard
from tests.conftest import REPO


def guard(window: int = 16, on_nonfinite: str = "skip", **kw: object) -> UpdateGuard:
    return UpdateGuard(ResilienceConfig(outlier_window=window, **kw), on_nonfinite, torch.device("cpu"))  # type: ignore[arg-type]


def feed(g: UpdateGuard, pairs: list[tuple[float, float]], first_step: int = 1) -> list[float]:
    out = []
    for i, (loss, gn) in enumerate(pairs):
        out.append(float(g.check(torch.tensor(loss), torch.tensor(gn), first_step + i, (i, i + 1))))
    return out


def noisy(n: int, seed: int = 0, loss: float = 6.0) -> list[tuple[float, float]]:
    gen = torch.Generator().manual_seed(seed)
    losses = loss + 0.1 * torch.randn(n, generator=gen)
    gn = 0.6 + 0.05 * torch.randn(n, generator=gen)
    return list(zip(losses.tolist(), gn.tolist(), strict=True))


CLEAN_STEPS = REPO / "tests" / "reference" / "guard_clean_steps.json"


def recorded_runs() -> dict[str, list[tuple[float, float]]]:
    """The first 64 steps (loss, grad norm) of real clean runs: the fast early fall of the loss, and a 27x grad-norm
    spike at step 27 of the shuffled tiny Shakespeare run."""
    runs = json.loads(CLEAN_STEPS.read_text())["runs"]
    return {k: list(zip(v["loss"], v["grad_norm"], strict=True)) for k, v in runs.items()}


def baseline(g: UpdateGuard) -> tuple[float, float]:
    """The loss level and spread the guard judges with now."""
    level, spread = g.baseline()
    return float(level[0]), float(spread[0])


def test_outliers_skipped_from_outlier_min_steps_on_and_kept_out_of_the_baseline() -> None:
    g = guard()
    assert feed(g, [(11.0, 0.6)]) == [0.0]  # nothing learned yet: an outlier is not judged
    g = guard()
    assert feed(g, noisy(8)) == [0.0] * 8  # outlier_min_steps (8) learned: the loss is judged from now on
    # A stretch of junk: every step is skipped (skipped values never enter the window and dilute it).
    assert feed(g, [(11.0, 0.6)] * 20, first_step=9) == [1.0] * 20
    assert int(g.learned) == 8
    assert feed(g, noisy(8, seed=1), first_step=29) == [0.0] * 8  # normal data again: accepted
    assert feed(g, [(6.0, 40.0)], first_step=37) == [1.0]  # a grad-norm spike alone, once the window is full (16)
    report = g.collect()
    assert [r.step for r in report.skipped] == [*range(9, 29), 37]
    assert all(r.flags & LOSS_OUTLIER for r in report.skipped[:-1]) and report.skipped[-1].loss_z < 6
    assert report.records[0].step == 1 and report.records[0].data == (0, 1)
    assert g.collect().records == []  # read once


def test_junk_fed_while_the_baseline_fills_does_not_raise_it() -> None:
    """Issue 19: the old mean/std window learned junk that arrived before it was full and then let the rest of
    the stretch through. Here junk among the first values (before anything is judged), and junk right after
    (while the 64-step window is far from full), leave the level and spread where the clean values put them."""
    clean = noisy(40)
    ref = guard(window=64)
    feed(ref, clean[:16])
    level, spread = baseline(ref)
    assert level == pytest.approx(6.0, abs=0.15) and 0.04 < spread < 0.25
    g = guard(window=64)
    mixed = [(11.0, 2.0) if i in (2, 5) else p for i, p in enumerate(clean[:8])]  # 2 junk of the first 8 ...
    assert feed(g, mixed) == [0.0] * 8  # ... are learned (nothing is judged before outlier_min_steps) ...
    assert feed(g, clean[8:16], first_step=9) == [0.0] * 8
    lvl, spr = baseline(g)
    # ... but do not move the level, and widen the spread (MAD of 15 residuals, 2 of them junk) by less than 2x; a
    # mean and standard deviation would have moved by 0.6 and 15x.
    assert abs(lvl - level) < 0.05 and spr < 2 * spread
    # A junk stretch that starts while the window fills: skipped from its first step, never learned.
    junk = [(10.5 + 0.05 * (i % 3), 0.3) for i in range(25)]
    assert feed(g, junk, first_step=17) == [1.0] * 25
    assert baseline(g) == (lvl, spr) and int(g.learned) == 16
    assert feed(g, clean[16:], first_step=42) == [0.0] * 24  # the clean data after it is learned again


def test_spiking_values_are_applied_but_never_learned() -> None:
    """A loss between spike_z_threshold and loss_z_threshold: its update goes in, the baseline does not learn it
    (the same holds with the outlier checks off); a run of them is the sustained spike the rollback watches."""
    for skip_outliers in (True, False):
        g = guard(skip_outlier_updates=skip_outliers)
        feed(g, noisy(16))
        level, spread = baseline(g)
        high = level + 5 * spread  # z 5: above spike_z_threshold (4), below loss_z_threshold (6)
        assert feed(g, [(high, 0.6)] * 12, first_step=17) == [0.0] * 12
        assert int(g.learned) == 16 and baseline(g) == (level, spread)
        assert all(r.spiking and not r.skipped for r in g.collect().records[16:])


def test_a_falling_loss_and_early_grad_norm_spikes_are_not_outliers() -> None:
    """Early training, as recorded in real clean runs: the falling loss sits below its lagging median level
    (one-sided z) and the spread comes from residuals against that level, so the fall is never an outlier; a grad-
    norm spike before the window is full (27x the recent level at step 27 of one run) is learned, not skipped.
    Junk (loss ~10.9) is skipped from step 17 on, while the window is still filling (issue 19's target)."""
    runs = recorded_runs()
    for name, steps in runs.items():
        g = guard(window=64)
        assert feed(g, steps) == [0.0] * 64, name
        records = g.collect().records
        assert max(r.loss_z for r in records[8:]) < 4 and not any(r.spiking for r in records), name
        assert int(g.learned) == 64
        for at in (17, 30, 50):
            g = guard(window=64)
            feed(g, steps[:at - 1])
            assert feed(g, [(10.9, 0.3)] * 5, first_step=at) == [1.0] * 5, (name, at)
    spiky = runs["quickstart model, tiny Shakespeare shuffled, seed 1"]
    assert spiky[26][1] > 20 * spiky[25][1]
    g = guard(window=64)
    feed(g, spiky)
    assert feed(g, [(spiky[-1][0], 20 * spiky[-1][1])], first_step=65) == [1.0]  # judged once the window is full


def test_a_loss_spike_with_an_exploding_grad_norm_is_an_instability_not_bad_data(
        caplog: pytest.LogCaptureFixture) -> None:
    """Step 23 of a clean tiny Shakespeare run (seed 2): loss 9.77 (z 13) with grad norm 64, 55x its level, after
    the previous update went too far; the next step recovers. Applied (clipped), not learned, logged as an
    instability. The same loss with the grad norm of a junk step (at most 6.6x its level measured) is skipped."""
    steps = recorded_runs()["quickstart model, tiny Shakespeare shuffled, seed 1"][:22]
    level = sorted(gn for _, gn in steps[-8:])[3]
    for gn, skipped in ((55 * level, False), (6.6 * level, True)):
        g = guard(window=64)
        feed(g, steps)
        with caplog.at_level("INFO", logger="hf_gpt2_train"):
            assert feed(g, [(9.77, gn)], first_step=23) == [float(skipped)]
            report = g.collect()
        [r] = report.records[22:]
        assert r.spiking and r.skipped == skipped and bool(r.flags & INSTABILITY) != skipped and r.loss_z > 6
        assert int(g.learned) == 22  # either way, not learned
        assert ("optimizer instability" in caplog.text) != skipped
        caplog.clear()


def test_non_finite_always_skipped_and_stops_when_asked() -> None:
    g = guard(on_nonfinite="stop")
    assert feed(g, [(float("nan"), 0.5), (5.0, float("inf"))]) == [1.0, 1.0]
    with pytest.raises(NonFiniteLossError, match="--on_nonfinite skip"):
        g.collect()
    g = guard(on_nonfinite="skip", skip_outlier_updates=False)
    assert feed(g, [*noisy(16), (float("nan"), 0.5), (50.0, 0.6)]) == [0.0] * 16 + [1.0, 0.0]  # outliers off
    assert [r.flags & NONFINITE for r in g.collect().skipped] == [NONFINITE]


def test_window_state_round_trips_exactly() -> None:
    a = guard()
    feed(a, noisy(20))
    b = guard()
    b.load_state_dict(a.state_dict())
    probe = [(6.45, 0.6), (6.9, 0.6), (6.0, 6.0), (6.2, 0.61)]
    decisions = feed(a, probe)
    assert decisions == feed(b, probe) and 0.0 in decisions and 1.0 in decisions
    assert torch.equal(a.history().nan_to_num(), b.history().nan_to_num()) and int(a.learned) == int(b.learned)
    c = guard(window=32)  # another window size: keeps the learned values (the last 32 when it is smaller)
    c.load_state_dict(a.state_dict())
    assert int(c.learned) == int(a.learned) and torch.equal(c.history()[:, -16:], a.history())
    assert torch.equal(c.baseline()[0], a.baseline()[0])  # the level (the spread has more residuals in c)
    d = guard(window=16, outlier_min_steps=8)
    d.load_state_dict(guard(window=64).state_dict())  # nothing learned yet
    assert int(d.learned) == 0 and feed(d, [(11.0, 0.6)]) == [0.0]


def test_the_older_window_format_loads(caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint written before issue 19: ``window`` a ring of the accepted values (slot = accepted % size,
    zeros while not full) and ``accepted``; its values become the history, in order."""
    pairs = noisy(70)
    for n_old in (20, 75):  # one ring wrapped around, one not full yet
        ring = torch.zeros(2, n_old)
        for i, p in enumerate(pairs):
            ring[:, i % n_old] = torch.tensor(p)
        g = guard(window=64)
        with caplog.at_level("INFO", logger="hf_gpt2_train"):
            g.load_state_dict({"window": ring.tolist(), "accepted": len(pairs)})
        assert "older format" in caplog.text
        kept = min(n_old, 64)
        assert torch.equal(g.history()[:, -kept:], torch.tensor(pairs[-kept:]).T) and int(g.learned) == 70
        assert g.history()[:, :64 - kept].isnan().all()
        assert feed(g, [(6.05, 0.6), (11.0, 0.6)], first_step=71) == [0.0, 1.0]


def _tiny_fp16_step(g: UpdateGuard, model: torch.nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    x: torch.Tensor, step: int, loss_scale: float = 1.0) -> torch.Tensor:
    """The trainer's step with Accelerate's fp16 order: scale, backward, unscale (clip), guard, scaler.step/update."""
    loss = model(x).square().mean() * loss_scale
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    skip = g.check(loss, grad_norm, step, (step, step + 1), g.scaler_overflow(scaler, opt))
    with g.applied_to(opt, skip, scaler):
        scaler.step(opt)
        scaler.update()
    opt.zero_grad(set_to_none=True)
    return skip


def test_grad_scaler_overflow_is_not_non_finite_and_outlier_skip_keeps_the_scale() -> None:
    """A real GradScaler with fused AdamW: an overflow is the scaler's (skipped, scale halved, never counted
    as non-finite even with --on_nonfinite stop); an outlier skip leaves the weights and the scaler as they were."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=1000)
    g = guard(on_nonfinite="stop")
    x = 10 * torch.randn(16, 4)  # loss ~30: times 2**127 it overflows float32
    w0 = model.weight.detach().clone()
    skip = _tiny_fp16_step(g, model, opt, scaler, x, 1)  # the scaler's overflow
    assert float(skip) == 0.0 and torch.equal(model.weight, w0) and scaler.get_scale() == 2.0**126
    steps = 1
    while scaler.get_scale() == 2.0 ** (127 - steps):  # until the scale fits (a few overflows)
        steps += 1
        _tiny_fp16_step(g, model, opt, scaler, x, steps)
    for _ in range(20):  # normal steps fill the window
        steps += 1
        assert float(_tiny_fp16_step(g, model, opt, scaler, x, steps)) == 0.0
    report = g.collect()  # would raise NonFiniteLossError if overflows counted as non-finite
    assert report.scaler_overflows >= 1 and not report.skipped
    assert all(r.flags & SCALER_OVERFLOW for r in report.records[:report.scaler_overflows])
    scaler.update(new_scale=2.0**10)  # headroom, so that the outlier below is not also an overflow
    scale, tracker = scaler.get_scale(), int(scaler._growth_tracker)
    w = model.weight.detach().clone()
    skip = _tiny_fp16_step(g, model, opt, scaler, x, steps + 1, loss_scale=1e3)  # an outlier loss
    assert float(skip) == 1.0 and torch.equal(model.weight, w)
    assert scaler.get_scale() == scale and int(scaler._growth_tracker) == tracker  # as if it never happened
    assert float(_tiny_fp16_step(g, model, opt, scaler, x, steps + 2)) == 0.0
    assert not torch.equal(model.weight, w) and int(scaler._growth_tracker) == tracker + 1
    assert [r.step for r in g.collect().skipped] == [steps + 1]


def test_loader_skips_ranges_for_good(tmp_path: Path, shared_data: Path) -> None:
    from hf_gpt2_train.data.loader import TrainLoader
    from hf_gpt2_train.data.prepare import PrepareArgs, run_prepare

    docs = [p for p in (shared_data / "tinyshakespeare.txt").read_text().split("\n\n") if p.strip()][:200]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data = run_prepare(PrepareArgs(source=str(src), output_dir=str(tmp_path / "d"), val_tokens=1000, num_proc=1,
                                   progress=False, verbose=False))

    def seqs(ld: TrainLoader, n: int) -> list[int]:
        out = []
        for _ in range(n):
            out.append(ld.position)
            ld.next_batch()
        return out

    a = TrainLoader(data, 16, 2, 0, 1, seed=1, shuffle=False)
    a.skip([(6, 10), (8, 14), (20, 22)])  # overlapping ranges merge
    assert a.skipped == [(6, 14), (20, 22)]
    assert seqs(a, 6) == [0, 2, 4, 14, 16, 18]
    state = a.state_dict()
    b = TrainLoader(data, 16, 1, 0, 2, seed=1, shuffle=False)  # a resume on 2 processes keeps the skip
    b.load_state_dict(state)
    assert seqs(b, 2) == [22, 24]
    c = TrainLoader(data, 16, 2, 0, 1, seed=1, shuffle=False)
    c.load_state_dict({**state, "epoch": 0, "cursor": 6})  # a position inside a range moves past it at once
    assert c.position == 14


def test_config_rejects_bad_resilience_values_at_once() -> None:
    cfg = build_config("quickstart", cli={"outlier_window": 2, "outlier_min_steps": 4, "loss_z_threshold": 0,
                                          "max_rollbacks": -1,
                                          "hang_timeout_minutes": 90, "collective_timeout_minutes": 60})
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    msg = str(e.value)
    assert "outlier_window" in msg and "loss_z_threshold" in msg and "max_rollbacks" in msg
    assert "outlier_min_steps must be between 8 and outlier_window" in msg
    assert "hang_timeout_minutes 90 must be shorter than collective_timeout_minutes 60" in msg


def test_watchdog_dumps_stacks_and_exits_with_its_code(tmp_path: Path) -> None:
    """A step that never completes: the watchdog writes every thread's stack and exits 5; the timeout is
    derived from the measured steps (never below the floor) when not fixed."""
    script = textwrap.dedent(f"""
        import time
        from hf_gpt2_train.config import ResilienceConfig
        from hf_gpt2_train.resilience.watchdog import HangWatchdog
        w = HangWatchdog(ResilienceConfig(hang_timeout_minutes=0.01), {str(tmp_path)!r}, rank=3, poll_s=0.05)
        def stuck_in_a_collective():
            time.sleep(60)
        with w:
            w.beat(1); w.beat(2)
            stuck_in_a_collective()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == EXIT_HANG, proc.stderr[-2000:]
    dumps = list((tmp_path / "hang").glob("rank3_pid*.txt"))
    assert len(dumps) == 1
    text = dumps[0].read_text()
    assert "last completed step 2" in text and "stuck_in_a_collective" in text and "hang-watchdog" not in text[:80]
    assert "exiting with code 5" in proc.stdout + proc.stderr

    from hf_gpt2_train.resilience.watchdog import MIN_AUTO_TIMEOUT_S, HangWatchdog

    w = HangWatchdog(ResilienceConfig(), tmp_path, rank=0)
    w._intervals.extend([0.5] * 10)
    assert w.timeout_s() == MIN_AUTO_TIMEOUT_S
    w._intervals.extend([200.0] * 30)  # 200 s steps: 20 x the median
    assert w.timeout_s() == 20 * 200.0
    w._slowest = 5000.0  # a slow eval/save: 1.5 x it
    assert w.timeout_s() == 7500.0


def test_fp16_grad_scaler_overflows_do_not_stop_a_real_run(tmp_path: Path) -> None:
    """Issue 11 item 7: a real Trainer whose Accelerator carries a real GradScaler overflows in its first steps
    and trains on with the default --on_nonfinite stop. The overflow steps are logged as scaler overflows, not
    as non-finite or guard-skipped updates (the code before this change stopped the run with exit 3 here).

    Harness, not product: Accelerate refuses fp16 on CPU (its GradScaler path is GPU-only), so after the Trainer
    is built its Accelerator and optimizer get the scaler the fp16 branch of ``Accelerator.__init__`` would have
    made, and the state says fp16 so that ``clip_grad_norm_`` unscales. Compute stays fp32 (fp16 matmuls are
    emulated and very slow on this CPU); a hook casts every scaled gradient through float16, so a gradient
    beyond fp16's range becomes inf exactly as in fp16 training. The scaler, its overflow detection, skipping
    and back-off are the real ones; the initial scale 2**24 is chosen to overflow the first steps.
    """
    from accelerate.optimizer import patch_optimizer_step

    from hf_gpt2_train.trainer import Trainer

    out = tmp_path / "fp16"
    cfg = build_config("quickstart", cli={
        "output_dir": str(out), "max_steps": 12, "logging_steps": 4, "checkpoint_steps": 0, "eval_steps": 0,
        "val_batches": 1, "hellaswag": False, "sample_max_new_tokens": 0,
        "report_to": "none",  # in-process: no tracker threads left behind in the test process
    })
    trainer = Trainer(cfg)
    acc, opt = trainer.accelerator, trainer.optimizer
    state = acc.state
    before = state._mixed_precision
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    for p in trainer.model.parameters():
        p.register_hook(lambda g: g.to(torch.float16).to(g.dtype))
    acc.scaler, acc.native_amp, state._mixed_precision = scaler, True, "fp16"
    opt.scaler, opt._accelerate_step_called = scaler, False
    opt._optimizer_original_step_method = opt.optimizer.step
    opt._optimizer_patched_step_method = patch_optimizer_step(opt, opt.optimizer.step)
    trainer.resilience.has_scaler = True
    try:
        assert trainer.train() == 0
    finally:
        state._mixed_precision = before
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    overflows = sum(r["train/scaler_overflows"] for r in rows)
    assert overflows >= 3 and sum(r["train/skipped_updates"] for r in rows) == 0
    assert scaler.get_scale() == 2.0 ** (24 - overflows)
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 1.0  # it trained after the overflows
    assert "non-finite" not in (out / "train.log").read_text()
