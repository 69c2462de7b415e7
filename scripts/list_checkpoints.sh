#!/usr/bin/env bash
# List a run's checkpoints: tier, step, tokens, val loss, size, age and whether each one is valid.
#
# Usage: scripts/list_checkpoints.sh [OUTPUT_DIR] [--checksums] [--json]
#   OUTPUT_DIR defaults to ./out; --checksums checks every file's checksum (default: sizes only).
# To check one checkpoint in full: python -m hf_gpt2_train checkpoints verify PATH
set -euo pipefail

out=out
if [[ $# -gt 0 && $1 != -* ]]; then
    out=$1
    shift
fi
py=${PYTHON:-$(command -v python || command -v python3)}
exec "$py" -m hf_gpt2_train checkpoints list "$out" "$@"
