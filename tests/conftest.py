"""Shared test set-up: CPU only, quiet TensorFlow, the repository root importable, and one
persistent compilation cache per test process (per pytest-xdist worker).

The cache: every run the tests launch (tests/launch_util.py passes the environment on), every
notebook kernel and this process compile into one fresh directory, so a program that several
tests build (a system's train step in its reference run, its resumed copy and its notebook) is
compiled once. Entries are keyed by program, jaxlib, XLA flags and compile options
(cxrjax/core/compile_cache.py), so sharing cannot hand a test another program's executable. A
JAX_COMPILATION_CACHE_DIR already set is used instead (and kept).
"""
import atexit
import os
import shutil
import sys
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Under pytest-xdist (two workers, pyproject's addopts) each worker gets its own: JAX writes cache
# entries in place (no rename), so a worker could read another's half-written executable.
_OWN_CACHE = "CXRJAX_TESTS_OWN_CACHE"
_inherited = os.environ.get("JAX_COMPILATION_CACHE_DIR")
if not _inherited or (_inherited == os.environ.get(_OWN_CACHE)
                      and os.environ.get("PYTEST_XDIST_WORKER")):
  _CACHE = tempfile.mkdtemp(prefix="cxrjax-tests-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_OWN_CACHE] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
# As cxrjax.core.compile_cache sets it for the systems: the cache's path stays out of the keys,
# so runs that turn the cache on themselves and runs that only inherit it share entries.
os.environ.setdefault("JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES", "none")
# Every program, not only those slower than 1 s: a launched run compiles some 200 small ones
# (eager initialisers, metrics), ~10 s of CPU that a later run of the session reads instead.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def _tiny_run(tmp_path_factory, system: str) -> tuple[str, object]:
  """One uninterrupted `configs/<system>.py:tiny` run through the launcher, in a fresh directory:
  (workdir, CompletedProcess)."""
  from launch_util import launch, ok
  workdir = str(tmp_path_factory.mktemp(system) / "run")
  proc = ok(launch("--config", os.path.join(ROOT, f"configs/{system}.py:tiny"), "--workdir", workdir))
  return workdir, proc


# A system's reference run, shared by its system test and its notebook's test (which opens a copy).
@pytest.fixture(scope="session")
def fmkd_tiny_run(tmp_path_factory):
  return _tiny_run(tmp_path_factory, "fmkd")


@pytest.fixture(scope="session")
def raygen_tiny_run(tmp_path_factory):
  return _tiny_run(tmp_path_factory, "raygen")


@pytest.fixture(scope="session")
def gmcd_tiny_run(tmp_path_factory):
  return _tiny_run(tmp_path_factory, "gmcd")
