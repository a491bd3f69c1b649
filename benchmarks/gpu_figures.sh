#!/usr/bin/env bash
# The GPU figures issues 2 and 4 ask for, in one run on a lent H100/H200 (the `device` tool).
#
#   bash benchmarks/gpu_figures.sh --download   # here: the two wheels the device image lacks -> .whl/
#   device run: command "bash benchmarks/gpu_figures.sh", carry [".whl"], timeout_s 590 (the three runs are capped at 570 s together)
#   bash benchmarks/gpu_figures.sh --smoke      # here, on CPU: the same plumbing at toy sizes
#
# The device image has jax (CUDA), flax, optax, orbax, einops, scipy, pandas, but not ml-collections
# or clu (its KINDS.md); the benchmarks import nothing else of cxrjax's dependencies (no grain, tfds,
# torch). Writes to $OUT (the device tool's output folder) or ./gpu_figures/: env.txt (nvidia-smi,
# versions) and one JSON-lines file per benchmark. MFU: bf16 against 989 TFLOP/s and fp32 against
# 494.7 (TF32, which XLA uses for fp32 matmuls on Hopper by default); H100 SXM and H200 share both.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
if [[ $mode == --download ]]; then
  grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  exec python3 -m pip download --no-deps --only-binary=:all: -d .whl ml-collections==1.1.0 clu==0.0.12
fi
out=${OUT:-gpu_figures}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
{ date -u; nvidia-smi 2>&1 | head -15
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
run() {  # run NAME TIMEOUT ARGS...: one benchmark, its JSON lines to $out/NAME.jsonl and the console
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 "benchmarks/$name.py" "$@" 2>"$out/$name.err" | tee -a "$out/$name.jsonl"
  local rc=${PIPESTATUS[0]}
  [[ $rc == 0 ]] || { echo "$name $* exited $rc"; tail -5 "$out/$name.err"; }
}
if [[ $mode == --smoke ]]; then
  run prior_step 300 --variants default --batch 8 --dtype float32 --steps 1 --repeats 1 --peak_tflops 1
  run densenet_step 300 --size 32 --batch 2 --dtype bfloat16 --repeats 1 --peak_tflops 1
  exit 0
fi
run prior_step 180 --variants paper --batch 64 256 --dtype bfloat16 --peak_tflops 989
run prior_step 180 --variants paper --batch 64 256 --dtype float32 --peak_tflops 494.7
run densenet_step 210 --batch 256 --dtype bfloat16 --peak_tflops 989
