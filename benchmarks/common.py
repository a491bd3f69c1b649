"""Shared by the benchmark scripts: the CPU's practical matmul limit, the MFU reference."""
from __future__ import annotations

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
