#!/usr/bin/env bash
# Start TensorBoard on a run's TensorBoard folder (OUTPUT_DIR/runs) and say how to reach it.
#
# Usage: scripts/start_tensorboard.sh [--logdir DIR] [--host HOST] [--port PORT] [-- EXTRA_TENSORBOARD_ARGS...]
#   --logdir DIR   TensorBoard folder (default: out/runs). An OUTPUT_DIR that holds runs/ works too.
#   --host HOST    address to bind (default: 127.0.0.1, reachable through an SSH tunnel only;
#                  0.0.0.0 exposes it to the network without authentication).
#   --port PORT    port (default: 6006).
# Environment: PYTHON (default: python3, or python) is the interpreter that has tensorboard installed.
set -euo pipefail

logdir="out/runs"
host="127.0.0.1"
port="6006"
extra=()
usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "start_tensorboard.sh: error: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --logdir|--host|--port)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      case "$1" in --logdir) logdir="$2" ;; --host) host="$2" ;; --port) port="$2" ;; esac
      shift 2 ;;
    --logdir=*) logdir="${1#*=}"; shift ;;
    --host=*) host="${1#*=}"; shift ;;
    --port=*) port="${1#*=}"; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[[ "$port" =~ ^[0-9]+$ ]] && (( port > 0 && port < 65536 )) || die "--port must be a number from 1 to 65535, not '$port'"
[[ -d "$logdir" ]] || die "log folder $logdir does not exist: pass --logdir OUTPUT_DIR/runs of a run"
# A run's output folder (run_info.json or checkpoints/ beside runs/) is accepted as well.
if [[ -d "$logdir/runs" && ( -f "$logdir/run_info.json" || -d "$logdir/checkpoints" ) ]]; then
  logdir="$logdir/runs"
fi

py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  for cand in python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import tensorboard" 2>/dev/null; then py="$cand"; break; fi
  done
fi
[[ -n "$py" ]] && "$py" -c "import tensorboard" 2>/dev/null \
  || die "tensorboard is not installed for ${py:-python3}: pip install tensorboard (or set PYTHON=/path/to/python)"

shown_host="$host"
[[ "$host" == "0.0.0.0" || "$host" == "::" ]] && shown_host="$(hostname -f 2>/dev/null || hostname)"
echo "TensorBoard for $logdir"
echo "  URL: http://$shown_host:$port/"
echo "  From your own machine, tunnel over SSH and open http://localhost:$port/ :"
echo "    ssh -N -L $port:localhost:$port ${USER:-user}@$(hostname -f 2>/dev/null || hostname)"
echo "  Stop with Ctrl-C."
# exec: signals (Ctrl-C, kill) reach TensorBoard itself
exec "$py" -m tensorboard.main --logdir "$logdir" --host "$host" --port "$port" ${extra[@]+"${extra[@]}"}
