"""The persistent compilation cache (cxrjax/core/compile_cache.py): a program compiled by one
process is loaded by another, wherever the cache directory lies."""
import os
import shutil
import subprocess
import sys

_PROBE = """
import sys
import jax, jax.numpy as jnp
from cxrjax.core.compile_cache import enable_compile_cache
assert enable_compile_cache(sys.argv[1], "unused") == sys.argv[1]
print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((4, 4))).sum()))
"""


def _run(cache: str) -> set[str]:
  env = {k: v for k, v in os.environ.items()
         if k != "JAX_COMPILATION_CACHE_DIR" and not k.startswith("JAX_PERSISTENT_CACHE")}
  env.update(JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # write all
  subprocess.run([sys.executable, "-c", _PROBE, cache], env=env, check=True, capture_output=True)
  return set(os.listdir(cache))


def test_a_copied_cache_serves_the_same_programs(tmp_path):
  # A workdir copied elsewhere (a resumed copy of a run) brings its cache along: every program
  # of the second process must be found there, none written anew. Until the XLA caches were
  # turned off, the cache's own path was part of every key and nothing was ever found.
  first = str(tmp_path / "a" / "jax_cache")
  written = _run(first)
  assert any(name.startswith("jit_") for name in written), written
  copy = str(tmp_path / "b" / "jax_cache")
  shutil.copytree(first, copy)
  assert _run(copy) == written
