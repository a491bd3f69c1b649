"""Shared by the benchmark scripts: the CPU's practical matmul limit (the MFU reference), the
train-step timing loop, and the options, backend choice and JSON rows of the JAX-against-PyTorch
scripts."""
from __future__ import annotations

import json
import os
import statistics
import sys
import time


def matmul_peak_flops(n_repeats: int = 10) -> float:
  """Large fp32 matmul throughput of this backend (FLOP/s): a 5184x512 @ 512x2048 jit matmul."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((5184, 512), jnp.float32)
  b = jnp.ones((512, 2048), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  times = []
  for _ in range(n_repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * 5184 * 512 * 2048 / statistics.median(times)


def time_train_step(step, state, batch, repeats: int, steps_per_repeat: int = 1, warmup: int = 2):
  """Times a compiled ``state, metrics = step(state, batch)``; returns (state, timing dict).

  The first call is timed alone as compile_s (compilation plus one step), then `warmup` steps
  run untimed, then `repeats` timed rounds of `steps_per_repeat` steps each, each round ending
  when the parameters and metrics are ready. Timing: sec_per_step and cpu_s_per_step (process CPU
  seconds over all threads, which swings less than wall time with a shared machine's load) are
  medians over the rounds; times lists each round's s/step; loadavg_1min_before is read just
  before the timed rounds.
  """
  import jax
  t0 = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  load_before = os.getloadavg()[0]
  times, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps_per_repeat):
      state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - t0) / steps_per_repeat)
    cpu.append((time.process_time() - c0) / steps_per_repeat)
  return state, {"sec_per_step": statistics.median(times), "times": [round(t, 4) for t in times],
                 "cpu_s_per_step": statistics.median(cpu), "compile_s": compile_s,
                 "loadavg_1min_before": load_before}


def alternate_rounds(runs, rounds: int, per_round: int) -> tuple[dict, dict]:
  """Times each of `runs` ({name: run(n)}, run doing n units and returning when they are done) in
  `rounds` alternating rounds of `per_round` units, so that a shared machine's load moves every
  variant alike. Returns ({name: [wall s per unit, a round each]}, {name: [process CPU s per
  unit]})."""
  times = {k: [] for k in runs}
  cpu = {k: [] for k in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      t0, c0 = time.perf_counter(), time.process_time()
      run(per_round)
      times[name].append((time.perf_counter() - t0) / per_round)
      cpu[name].append((time.process_time() - c0) / per_round)
  return times, cpu


# ----------------------------------------------------------------------------- JAX against PyTorch
def add_comparison_args(p, *, rounds: int, per_round: str, per_round_default: int) -> None:
  """The options every JAX-against-PyTorch script takes (precision, device, torch threads, the
  alternating rounds, the check switch, the MFU peak, the JSON copy, --quick); `per_round` names
  the script's unit, e.g. 'steps_per_round'."""
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
  p.add_argument("--rounds", type=int, default=rounds)
  p.add_argument(f"--{per_round}", type=int, default=per_round_default)
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
  p.add_argument("--no_torch", action="store_true",
                 help="time JAX alone (the weights and the check still need torch)")
  p.add_argument("--no_check", action="store_true")
  p.add_argument("--peak_tflops", "--peak-tflops", dest="peak_tflops", type=float, default=0.0,
                 help="nominal dense peak of the accelerator for MFU (e.g. 989 for H100 bf16)")
  p.add_argument("--json_out", default="", help="also write the JSON lines to this file")
  p.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds (plumbing check)")


def parse_comparison_args(p, quick: dict):
  """p.parse_args(), with the script's `quick` sizes applied under --quick."""
  args = p.parse_args()
  if args.quick:
    for k, v in quick.items():
      setattr(args, k, v)
  return args


def select_backend(device_arg: str) -> tuple[str, str]:
  """Imports JAX on the asked device ('cpu' pins it before the import): (JAX's backend, the
  matching torch device, 'cuda' or 'cpu'). Exits when --device gpu finds no GPU."""
  if device_arg == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  backend = jax.default_backend()
  if device_arg == "gpu" and backend != "gpu":
    sys.exit(f"error: --device gpu but JAX's backend is {backend}")
  return backend, "cuda" if backend == "gpu" else "cpu"


class JsonLines:
  """The rows a script reports: each printed as a JSON line on stdout when emitted, and all of
  them appended to --json_out by save()."""

  def __init__(self):
    self.lines: list[str] = []

  def __call__(self, row: dict) -> None:
    self.lines.append(json.dumps(row))
    print(self.lines[-1], flush=True)

  def save(self, path: str) -> None:
    if path:
      with open(path, "a") as f:
        f.write("\n".join(self.lines) + "\n")
