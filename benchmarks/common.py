"""Shared by the benchmark scripts: the CPU's practical matmul limit (the MFU reference) and
the train-step timing loop."""
from __future__ import annotations

import os
import statistics
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
