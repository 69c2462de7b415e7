"""The device check's summary (``OUT_DIR/gpu_check.md``) from its JSON document (``scripts/gpu_check.py``)."""

from __future__ import annotations

from typing import Any


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def summary(doc: dict[str, Any]) -> str:
    env = next((s.get("result") or {} for s in doc["steps"] if s["name"] == "env"), {})
    lines = [f"# GPU check {doc['date']}{' (dry run, CPU)' if doc['dry_run'] else ''}", "",
             f"Device: {env.get('device', '?')}, driver {env.get('driver', '-')}, torch {env.get('torch', '?')} "
             f"(CUDA {env.get('cuda', '-')}), transformers {env.get('transformers', '?')}, accelerate "
             f"{env.get('accelerate', '?')}, torchao {env.get('torchao', '-')}, TE {env.get('transformer_engine', '-')}."
             f" Wall time {doc['wall_s']:.0f} s of a {doc['budget_s']:.0f} s budget.", "",
             "| step | status | wall s | notes |", "| --- | --- | --- | --- |"]
    for s in doc["steps"]:
        note = (s.get("error") or "").splitlines()[0][:160] if s["status"] != "ok" else s["what"]
        lines.append(f"| {s['name']} | {s['status']} | {s['wall_s']:.0f} | {note} |")
    rows = []
    for s in doc["steps"]:
        for prec, r in ((s.get("result") or {}).get("precisions") or {}).items():
            if "tokens_per_sec" in r:
                p = r.get("plain", {})
                rows.append(f"| {s['name']} | {prec} | {r['tokens_per_sec']:,.0f} | {_fmt(p.get('tokens_per_sec'), ',.0f')}"
                            f" | {_fmt(r.get('overhead_ratio'), '.3f')} | {_fmt(r.get('mfu'), '.1%')} | "
                            f"{_fmt(r.get('peak_memory_gb'), '.1f')} | {_fmt(r.get('fp8_coverage'), '.1%')} |")
            else:
                rows.append(f"| {s['name']} | {prec} | {'skipped' if 'skipped' in r else 'failed'}: "
                            f"{(r.get('skipped') or r.get('failed') or '')[:100]} | | | | | |")
    if rows:
        lines += ["", "| bench | precision | ours tok/s | plain tok/s | ours/plain time | MFU | peak GB | fp8 cov |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |", *rows]
    memory = next((s.get("result") or {} for s in doc["steps"] if s["name"] == "memory_modes"), {})
    if memory.get("table"):
        lines += ["", f"| preset | activation checkpointing ({memory['precision']}) | activation bytes/token | ms/step | "
                  "max micro-batch 24 GB | 40 GB | 80 GB |", "| --- | --- | --- | --- | --- | --- | --- |",
                  *memory["table"]]
    saves = next((s.get("result") or {} for s in doc["steps"] if s["name"] == "saves"), {})
    if "wall_s" in saves:
        w = saves["wall_s"]
        lines += ["", f"Saves (whole-run wall time): final save only {w['final_only']:.1f} s, synchronous "
                  f"{w['sync']:.1f} s, asynchronous {w['async']:.1f} s: async costs "
                  f"{_fmt(saves['async_vs_sync_cost'], '.2f')}x of sync's (target <= 0.5)."]

    tr = next((s.get("result") or {} for s in doc["steps"] if s["name"] == "train_resume"), {})
    if "max_abs_loss_diff" in tr:
        lines += ["", f"Resume: max |loss difference| after step {tr['resumed_at']} = {tr['max_abs_loss_diff']:.3g} "
                  f"(bitwise equal: {tr['bitwise_equal']}), loss {tr['first_loss']:.3f} -> {tr['final_loss']:.3f}."]
    return "\n".join(lines) + "\n"
