#!/usr/bin/env bash
# The device check: every GPU claim of the trainer measured in one command (about 8 minutes on one H100/H200).
#
# Usage: scripts/gpu_check.sh OUT_DIR
#   Writes OUT_DIR/gpu_check.json (each step's status, wall time, commands, results), OUT_DIR/gpu_check.md (a
#   summary) and OUT_DIR/gpu_check.log. Steps: environment; bench gpt2 and gpt2-large (ours vs a plain loop; bf16,
#   fp8 through torchao, TransformerEngine when it imports); a 30-step gpt2 train with compile that saves, resumes
#   and compares losses; FSDP2 for 10 steps with a save and an export; what periodic saves cost a whole run
#   (synchronous vs asynchronous); then, time permitting, the lm_head variants, the activation checkpointing modes
#   and Muon (its step time against AdamW in one run, a short Muon + WSD run).
#   Each step is independent: a failure is recorded and the next step runs. Exit code 0 when every step is ok.
#   GPU_CHECK_DRY_RUN=1: the same steps on CPU at the quickstart size (CI runs this).
#   GPU_CHECK_BUDGET_S (default 480, dry run 600), GPU_CHECK_WORK_DIR (checkpoints etc.; default a temp folder),
#   PYTHON (default python3).
# The package runs from this working tree (never installed). Wheels in .whl/ (torchao for a machine without
# network) are installed into a temporary folder first; see docs/benchmarks.md for the exact command.
set -euo pipefail

if [[ $# -ne 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit $(( $# == 1 ? 0 : 2 ))
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$(command -v python3 || command -v python)}
dry=${GPU_CHECK_DRY_RUN:-0}
if [[ $dry == 0 ]] && compgen -G "$repo/.whl/*.whl" > /dev/null; then
    site=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-site.XXXXXX")
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$repo"/.whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$py" "$repo/scripts/gpu_check.py" "$1"
