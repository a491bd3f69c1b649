"""JAX's persistent compilation cache, as the systems' `compile_cache` config field sets it.

Compiling a DenseNet-169 step takes minutes on a CPU; with the cache, later seeds, stages that
share a program and reruns of the same command load it instead.

An entry is keyed by the program (its StableHLO without locations), jaxlib, the platform, the XLA
flags and the compile options, so one directory can serve any number of runs, of any config or
mesh. JAX also points XLA's GPU caches (`jax_persistent_cache_enable_xla_caches`, by default the
per-fusion autotuning cache) at a folder inside the cache directory, and that absolute path is
part of the compile options and so of every key: a workdir copied or moved elsewhere (a resumed
test run, a run continued on another disk) or two runs with their own caches never shared an
entry, on CPU (where those caches do nothing) included. cxrjax turns them off, so the same program
gets the same key wherever the cache lies (measured: a GMCD :tiny run resumed in a copy of its
workdir recompiled its 27 s student step; now it loads it).
"""
from __future__ import annotations

import os

import jax

# Programs that compile faster than this are not written (JAX's own default; the environment's
# JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, when set, is kept: the tests set 0).
MIN_COMPILE_SECS = 1.0


def enable_compile_cache(setting: str, workdir: str) -> str | None:
  """setting: '' = the default, 'none' = off, else a directory (share one between runs).

  The default is the directory the environment names in JAX's own variable,
  JAX_COMPILATION_CACHE_DIR (one cache for every run of a machine or a test session), else
  <workdir>/jax_cache. Returns the directory in use, or None."""
  if setting == "none":
    return None
  path = os.path.abspath(setting or os.environ.get("JAX_COMPILATION_CACHE_DIR")
                         or os.path.join(workdir, "jax_cache"))
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # else JAX has read it
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
  jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
  return path
