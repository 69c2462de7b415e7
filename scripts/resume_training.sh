#!/usr/bin/env bash
# Resume a run from its checkpoints with the run's own configuration (read from OUTPUT_DIR/run_info.json).
#
# Usage: scripts/resume_training.sh OUTPUT_DIR [latest|best|backup|auto|TIER|CHECKPOINT_PATH] [train flags...]
#   scripts/resume_training.sh out                        # continue from checkpoints/latest
#   scripts/resume_training.sh out best --max_steps 30000 # from the best checkpoint, train longer
#   LAUNCHER="torchrun --nproc_per_node 4" scripts/resume_training.sh out
#   LAUNCHER="accelerate launch --config_file accelerate_configs/multi_gpu.yaml" scripts/resume_training.sh out
# Extra flags override the saved configuration. PYTHON selects the interpreter (default: python).
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit $(( $# < 1 ? 2 : 0 ))
fi
out=$1
shift
which=latest
if [[ $# -gt 0 && $1 != -* ]]; then
    which=$1
    shift
fi
if [[ ! -f $out/run_info.json ]]; then
    echo "resume_training.sh: $out/run_info.json not found: pass the --output_dir of an existing run" >&2
    exit 2
fi
py=${PYTHON:-$(command -v python || command -v python3)}
config=$out/resume_config.yaml
# The resolved config of the run, as a --config file (JSON is read with the standard library, written as YAML).
"$py" - "$out/run_info.json" "$config" <<'PY'
import json
import sys

import yaml

cfg = json.load(open(sys.argv[1]))["config"]
cfg.get("checkpoint", {}).pop("resume_from_checkpoint", None)
with open(sys.argv[2], "w") as f:
    f.write("# written by scripts/resume_training.sh from run_info.json\n")
    yaml.safe_dump(cfg, f, sort_keys=False)
PY
# shellcheck disable=SC2086  # LAUNCHER is a command line on purpose
exec ${LAUNCHER:-$py} -m hf_gpt2_train train --config "$config" --output_dir "$out" \
    --resume_from_checkpoint "$which" "$@"
