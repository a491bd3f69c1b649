#!/usr/bin/env bash
# Runs N cooperating CPU processes of cxrjax.launch on 127.0.0.1 (multi-host rehearsal).
#
#   launch/local_multiprocess.sh 2 -- --config configs/prior.py:tiny --workdir runs/mp
#
# Each process gets --coordinator_address/--num_processes/--process_id; extra launcher
# flags (e.g. --cpu_devices=2) pass through. If one process fails, the others are stopped.
# Environment: PYTHON (default python), CXRJAX_PORT (default: a free port).
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 N -- <cxrjax.launch arguments>" >&2; exit 2
fi
n=$1; shift
[[ "${1:-}" == "--" ]] && shift
py=${PYTHON:-python}
port=${CXRJAX_PORT:-$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
for ((i = 0; i < n; i++)); do
  JAX_PLATFORMS=cpu "$py" -m cxrjax.launch "$@" --coordinator_address="127.0.0.1:$port" \
    --num_processes="$n" --process_id="$i" &
  pids+=($!)
done
status=0
for ((k = 0; k < n; k++)); do
  if ! wait -n; then status=1; cleanup; fi
done
trap - EXIT
exit $status
