"""Evaluation split across 2 processes (torchrun, gloo on CPU) gives the same results as 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Runs the trainer's Evaluator on a DDP-prepared model: val batches split by rank (rank r takes batches
# r, r+world, ...), HellaSwag examples split by i % world, samples on every rank. Each rank writes its view.
SCRIPT = r'''
import json, sys
import torch
from accelerate import Accelerator
from hf_gpt2_train.config import build_config
from hf_gpt2_train.data.tokenizer import get_encoding
from hf_gpt2_train.evaluate import Evaluator, hellaswag_eval
from hf_gpt2_train.model import build_model
from hf_gpt2_train.process_exit import leave

shared, out = sys.argv[1], sys.argv[2]
cfg = build_config("quickstart", cli={"hellaswag_path": f"{shared}/hellaswag_val.jsonl", "hellaswag_limit": 41,
                                      "sample_max_new_tokens": 6, "n_positions": 64, "seq_len": 64})
acc = Accelerator(cpu=True)
model = acc.prepare(build_model(cfg.model, seed=11))
enc = get_encoding()
data = torch.tensor(enc.encode(open(f"{shared}/tinyshakespeare.txt").read()[:30000]))
batches = []
for b in range(6):
    rows = [data[(b * 2 + i) * 64: (b * 2 + i) * 64 + 65] for i in range(2)]
    batches.append((torch.stack([r[:-1] for r in rows]), torch.stack([r[1:] for r in rows])))
ev = Evaluator(cfg, acc, model, batches[acc.process_index::acc.num_processes], enc)
metrics, samples = ev.run(step=100)
hs = hellaswag_eval(model, ev.hellaswag, enc, acc, 50257, limit=41, batch_examples=4)
json.dump({"metrics": metrics, "samples": samples, "hellaswag": hs, "world": acc.num_processes,
           "is_ddp": type(model).__name__}, open(f"{out}/rank{acc.process_index}.json", "w"))
leave(0)  # as the CLI ends a multi-process run: gloo can abort a worker in the interpreter's teardown
'''


def _run(tmp: Path, shared_data: Path, nproc: int) -> list[dict]:
    out = tmp / f"world{nproc}"
    out.mkdir()
    script = tmp / "eval_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(script)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--standalone", str(script)]
    proc = subprocess.run([*cmd, str(shared_data), str(out)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.slow
def test_two_ranks_equal_one_rank(tmp_path, shared_data) -> None:
    (one,) = _run(tmp_path, shared_data, 1)
    two = _run(tmp_path, shared_data, 2)
    assert two[0]["world"] == 2 and two[0]["is_ddp"] == "DistributedDataParallel"
    m1 = one["metrics"]
    assert set(m1) == {"eval/val_loss", "eval/hellaswag_acc", "eval/hellaswag_acc_norm"}
    for r in two:  # every rank gets the reduced values
        m2 = r["metrics"]
        assert m2["eval/val_loss"] == pytest.approx(m1["eval/val_loss"], rel=1e-6)
        # 41 examples: rank 0 scores 21, rank 1 scores 20 (and makes one dummy forward to stay in step)
        assert m2["eval/hellaswag_acc"] == m1["eval/hellaswag_acc"]
        assert m2["eval/hellaswag_acc_norm"] == m1["eval/hellaswag_acc_norm"]
        assert r["samples"] == one["samples"]
        # every example counted exactly once across the ranks
        assert r["hellaswag"] == one["hellaswag"] and r["hellaswag"]["count"] == 41
        assert r["hellaswag"]["acc_norm"] == m1["eval/hellaswag_acc_norm"]
    assert len(one["samples"]) == 2 and all(" -> " in s for s in one["samples"])
