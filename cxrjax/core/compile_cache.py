"""JAX's persistent compilation cache, as the systems' `compile_cache` config field sets it.

Compiling a DenseNet-169 step takes minutes on a CPU; with the cache, later seeds, stages that
share a program and reruns of the same command load it instead.
"""
from __future__ import annotations

import os

import jax


def enable_compile_cache(setting: str, workdir: str) -> str | None:
  """setting: '' = <workdir>/jax_cache, 'none' = off, else a directory (share one between runs).
  Returns the directory in use, or None."""
  if setting == "none":
    return None
  path = os.path.abspath(setting or os.path.join(workdir, "jax_cache"))
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return path
